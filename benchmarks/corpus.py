"""Test corpora: real DICOM files written with pydicom, cached under benchmarks/work/.

- "small": 2,000 CT instances of 64x64 16-bit (10 studies x 4 series x 50).
- "ct":    600 CT instances of 512x512 16-bit (2 studies x 3 series x 100).
- "big":   one Enhanced CT instance of 2,048 frames of 512x512 16-bit (1 GiB of
           pixel data). The header is written by pydicom; the Pixel Data element
           is appended frame by frame, so the generator never holds the pixels.

Every file is Explicit VR Little Endian with a File Meta group, unique UIDs and
the usual patient/study/series/image attributes. Series corpora are split into
four directories (``part0`` .. ``part3``, contiguous runs of series) so that four
senders can share them; a single sender sends the corpus root recursively.

A corpus is regenerated when its spec or GENERATOR_VERSION changes (see the
``<name>.json`` stamp written last, after every file is in place).
"""

import dataclasses
import datetime
import json
import random
import resource
import shutil
import struct
import sys
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

GENERATOR_VERSION = 1
PARTS = 4

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"


@dataclass(frozen=True)
class CorpusSpec:
    name: str
    studies: int
    series_per_study: int
    instances_per_series: int
    rows: int
    columns: int
    frames: int = 1  # > 1: one multi-frame instance per series

    @property
    def instances(self) -> int:
        return self.studies * self.series_per_study * self.instances_per_series

    @property
    def multiframe(self) -> bool:
        return self.frames > 1

    def describe(self) -> str:
        if self.multiframe:
            size = self.rows * self.columns * 2 * self.frames
            return (
                f"{self.instances} Enhanced CT instance of {self.frames} frames "
                f"{self.rows}x{self.columns} 16-bit ({size / 2**20:.0f} MiB of pixels)"
            )
        return (
            f"{self.instances} CT instances of {self.rows}x{self.columns} 16-bit "
            f"({self.studies} studies x {self.series_per_study} series x "
            f"{self.instances_per_series})"
        )


FULL_SPECS = {
    "small": CorpusSpec("small", 10, 4, 50, 64, 64),
    "ct": CorpusSpec("ct", 2, 3, 100, 512, 512),
    "big": CorpusSpec("big", 1, 1, 1, 512, 512, frames=2048),
}

# --quick: same shapes, tiny counts (a smoke test of the harness, not a measurement).
QUICK_SPECS = {
    "small": CorpusSpec("small-quick", 2, 2, 10, 64, 64),
    "ct": CorpusSpec("ct-quick", 1, 2, 8, 512, 512),
    "big": CorpusSpec("big-quick", 1, 1, 1, 512, 512, frames=64),
}


@dataclass
class Corpus:
    key: str  # "small", "ct" or "big"
    spec: CorpusSpec
    root: Path
    parts: list[Path]  # non-empty directories, for parallel senders
    instances: int
    bytes: int

    def to_json(self) -> dict:
        return {
            "key": self.key,
            "name": self.spec.name,
            "description": self.spec.describe(),
            "instances": self.instances,
            "bytes": self.bytes,
            "root": str(self.root),
            "parts": [str(p) for p in self.parts],
        }


def ensure_corpus(key: str, spec: CorpusSpec, work_dir: Path, say=print) -> Corpus:
    """Return the cached corpus for `spec`, generating it first if needed."""
    root = work_dir / "corpus" / spec.name
    # beside the corpus, not in it: the corpus root holds DICOM files only (storescu +sd +r)
    stamp_path = root.with_name(spec.name + ".json")
    wanted = {"generator_version": GENERATOR_VERSION, "spec": dataclasses.asdict(spec)}
    if stamp_path.exists():
        stamp = json.loads(stamp_path.read_text())
        if {k: stamp.get(k) for k in wanted} == wanted:
            return _corpus(key, spec, root, stamp)
    stamp_path.unlink(missing_ok=True)
    if root.exists():
        shutil.rmtree(root)
    say(f"generating corpus '{spec.name}': {spec.describe()} -> {root}")
    started = time.monotonic()
    temp_root = root.with_name(root.name + ".partial")
    if temp_root.exists():
        shutil.rmtree(temp_root)
    temp_root.mkdir(parents=True)
    _generate(spec, temp_root)
    files = sorted(p for p in temp_root.rglob("*.dcm"))
    stamp = dict(
        wanted,
        instances=len(files),
        bytes=sum(p.stat().st_size for p in files),
        generated_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        generator_max_rss_mib=round(_self_max_rss_mib(), 1),
    )
    temp_root.rename(root)
    stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")
    say(
        f"  done in {time.monotonic() - started:.1f} s: {stamp['instances']} files, "
        f"{stamp['bytes'] / 2**20:.1f} MiB (generator max RSS so far "
        f"{stamp['generator_max_rss_mib']} MiB)"
    )
    return _corpus(key, spec, root, stamp)


def _corpus(key: str, spec: CorpusSpec, root: Path, stamp: dict) -> Corpus:
    parts = [p for p in sorted(root.glob("part*")) if any(p.rglob("*.dcm"))]
    if stamp["instances"] != spec.instances:
        raise RuntimeError(f"corpus {root}: {stamp['instances']} files, expected {spec.instances}")
    return Corpus(key, spec, root, parts, stamp["instances"], stamp["bytes"])


def files_by_study(corpus: Corpus) -> dict[str, list[Path]]:
    """The corpus's files by Study Instance UID, each study's in name order."""
    studies: dict[str, list[Path]] = {}
    for path in sorted(corpus.root.rglob("*.dcm")):
        header = dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
        studies.setdefault(str(header.StudyInstanceUID), []).append(path)
    return studies


def _self_max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- generation ---------------------------------------------------------------------------


def _generate(spec: CorpusSpec, root: Path) -> None:
    rng = random.Random(f"imaging-scp-bench-{spec.name}")
    phantom = _phantom(spec.rows, spec.columns)
    index = 0  # instances in contiguous, equal runs per part: even split for parallel senders
    for study_no in range(1, spec.studies + 1):
        study = _study_attributes(rng, study_no)
        for series_no in range(1, spec.series_per_study + 1):
            series = _series_attributes(study, series_no)
            for number in range(1, spec.instances_per_series + 1):
                part = index * PARTS // spec.instances
                index += 1
                directory = root / f"part{part}" / f"study{study_no:02d}" / f"series{series_no:02d}"
                directory.mkdir(parents=True, exist_ok=True)
                path = directory / f"im{number:04d}.dcm"
                if spec.multiframe:
                    _write_multiframe(spec, study, series, phantom, path)
                else:
                    _save(_ct_image(spec, study, series, number, phantom), path)


def _phantom(rows: int, columns: int) -> bytes:
    """A CT-like slice: air, a water ellipse with a bone ring and two lungs (stored = HU + 1024)."""
    pixels = array("H", bytes(rows * columns * 2))
    cy, cx = rows / 2, columns / 2
    for y in range(rows):
        dy = (y - cy) / (rows * 0.42)
        for x in range(columns):
            dx = (x - cx) / (columns * 0.46)
            r2 = dx * dx + dy * dy
            if r2 > 1.0:
                hu = -1000
            elif r2 > 0.85:
                hu = 700  # ribs / body wall
            else:
                lx = ((x - cx) / (columns * 0.18)) ** 2
                lung = ((abs(x - cx) - columns * 0.2) / (columns * 0.13)) ** 2 + (
                    (y - cy) / (rows * 0.25)
                ) ** 2
                hu = -850 if lung < 1.0 else 40 + int(20 * lx) % 30
            pixels[y * columns + x] = hu + 1024
    if sys.byteorder != "little":
        pixels.byteswap()
    return pixels.tobytes()


def _slice_pixels(phantom: bytes, columns: int, shift: int) -> bytes:
    """The phantom rolled by `shift` rows, so consecutive slices differ."""
    row = columns * 2
    offset = (shift * row) % len(phantom)
    return phantom[offset:] + phantom[:offset]


_GIVEN = ["ANNA", "BERND", "CLARA", "DAVID", "EMMA", "FELIX", "GRETA", "HUGO", "IDA", "JONAS"]
_FAMILY = ["MUELLER", "SCHMIDT", "WEBER", "WAGNER", "BECKER", "HOFFMANN", "KOCH", "RICHTER"]
_STUDIES = [
    ("CT THORAX", "CHEST"),
    ("CT ABDOMEN", "ABDOMEN"),
    ("CT HEAD", "HEAD"),
    ("CT PELVIS", "PELVIS"),
]
_SERIES = ["Topogram", "Axial 5.0 B30f", "Axial 1.0 B70f", "Coronal MPR", "Sagittal MPR"]


def _study_attributes(rng: random.Random, number: int) -> dict:
    description, body_part = rng.choice(_STUDIES)
    day = datetime.date(2024, 1, 1) + datetime.timedelta(days=rng.randrange(365))
    birth = datetime.date(1940, 1, 1) + datetime.timedelta(days=rng.randrange(60 * 365))
    return {
        "PatientName": f"{rng.choice(_FAMILY)}^{rng.choice(_GIVEN)}",
        "PatientID": f"P{rng.randrange(10**7):07d}",
        "PatientBirthDate": birth.strftime("%Y%m%d"),
        "PatientSex": rng.choice("MF"),
        "StudyInstanceUID": generate_uid(),
        "StudyDate": day.strftime("%Y%m%d"),
        "StudyTime": f"{rng.randrange(7, 19):02d}{rng.randrange(60):02d}{rng.randrange(60):02d}",
        "AccessionNumber": f"A{rng.randrange(10**8):08d}",
        "StudyID": str(number),
        "StudyDescription": description,
        "BodyPartExamined": body_part,
        "ReferringPhysicianName": f"{rng.choice(_FAMILY)}^{rng.choice(_GIVEN)}",
        "FrameOfReferenceUID": generate_uid(),
    }


def _series_attributes(study: dict, number: int) -> dict:
    return {
        "SeriesInstanceUID": generate_uid(),
        "SeriesNumber": number,
        "SeriesDescription": _SERIES[number % len(_SERIES)],
        "SeriesDate": study["StudyDate"],
        "SeriesTime": study["StudyTime"],
    }


def _common(ds: Dataset, study: dict, series: dict) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    for keyword, value in {**study, **series}.items():
        setattr(ds, keyword, value)
    ds.Modality = "CT"
    ds.Manufacturer = "BENCH MEDICAL"
    ds.ManufacturerModelName = "Synthetic CT 64"
    ds.InstitutionName = "imaging-scp benchmark"
    ds.StationName = "CT01"
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = "bench-1"
    ds.PatientPosition = "HFS"
    ds.PositionReferenceIndicator = ""
    ds.KVP = "120"
    ds.ContentDate = study["StudyDate"]
    ds.ContentTime = study["StudyTime"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _ct_image(spec: CorpusSpec, study: dict, series: dict, number: int, phantom: bytes):
    ds = Dataset()
    _common(ds, study, series)
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta = _file_meta(ds.SOPClassUID, ds.SOPInstanceUID)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = number
    z = -200.0 + number * 1.25
    ds.ImagePositionPatient = [-250.0, -250.0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceLocation = z
    ds.SliceThickness = "1.25"
    spacing = round(500.0 / spec.columns, 4)
    ds.PixelSpacing = [spacing, spacing]
    ds.Rows = spec.rows
    ds.Columns = spec.columns
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.ConvolutionKernel = "B30f"
    ds.PixelData = _slice_pixels(phantom, spec.columns, number)
    ds["PixelData"].VR = "OW"
    return ds


def _save(ds: Dataset, path: Path) -> None:
    dcmwrite(path, ds, enforce_file_format=True)


def _item(**attributes) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def _write_multiframe(spec: CorpusSpec, study: dict, series: dict, phantom: bytes, path: Path):
    """An Enhanced CT instance: pydicom writes the header, the pixels are streamed after it."""
    ds = Dataset()
    _common(ds, study, series)
    ds.SOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta = _file_meta(ds.SOPClassUID, ds.SOPInstanceUID)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.InstanceNumber = 1
    ds.AcquisitionNumber = 1
    ds.AcquisitionDateTime = study["StudyDate"] + study["StudyTime"]
    ds.AcquisitionDuration = 12.5
    ds.ContentQualification = "PRODUCT"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.Rows = spec.rows
    ds.Columns = spec.columns
    ds.NumberOfFrames = spec.frames
    organization = generate_uid()
    ds.DimensionOrganizationSequence = Sequence([_item(DimensionOrganizationUID=organization)])
    ds.DimensionIndexSequence = Sequence(
        [
            _item(
                DimensionOrganizationUID=organization,
                DimensionIndexPointer=0x00209056,  # Stack ID
                FunctionalGroupPointer=0x00209111,  # Frame Content Sequence
            ),
            _item(
                DimensionOrganizationUID=organization,
                DimensionIndexPointer=0x00209057,  # In-Stack Position Number
                FunctionalGroupPointer=0x00209111,
            ),
        ]
    )
    spacing = round(500.0 / spec.columns, 4)
    ds.SharedFunctionalGroupsSequence = Sequence(
        [
            _item(
                PixelMeasuresSequence=Sequence(
                    [
                        _item(
                            PixelSpacing=[spacing, spacing],
                            SliceThickness="0.5",
                            SpacingBetweenSlices="0.5",
                        )
                    ]
                ),
                PlaneOrientationSequence=Sequence(
                    [_item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])]
                ),
                FrameVOILUTSequence=Sequence([_item(WindowCenter="40", WindowWidth="400")]),
                PixelValueTransformationSequence=Sequence(
                    [_item(RescaleIntercept="-1024", RescaleSlope="1", RescaleType="HU")]
                ),
                CTImageFrameTypeSequence=Sequence(
                    [
                        _item(
                            FrameType=["ORIGINAL", "PRIMARY", "VOLUME", "NONE"],
                            PixelPresentation="MONOCHROME",
                            VolumetricProperties="VOLUME",
                            VolumeBasedCalculationTechnique="NONE",
                        )
                    ]
                ),
            )
        ]
    )
    ds.PerFrameFunctionalGroupsSequence = Sequence(
        [
            _item(
                FrameContentSequence=Sequence(
                    [
                        _item(
                            FrameAcquisitionNumber=1,
                            StackID="1",
                            InStackPositionNumber=frame,
                            DimensionIndexValues=[1, frame],
                        )
                    ]
                ),
                PlanePositionSequence=Sequence(
                    [_item(ImagePositionPatient=[-250.0, -250.0, -500.0 + frame * 0.5])]
                ),
            )
            for frame in range(1, spec.frames + 1)
        ]
    )
    frame_bytes = spec.rows * spec.columns * 2
    total = frame_bytes * spec.frames
    if total >= 2**32 - 1:
        raise ValueError("Pixel Data above 4 GiB needs encapsulation; not supported here")
    dcmwrite(path, ds, enforce_file_format=True)
    del ds
    with path.open("ab") as handle:
        # (7FE0,0010) OW, 2 reserved bytes, 32-bit length: Explicit VR Little Endian
        handle.write(struct.pack("<HH", 0x7FE0, 0x0010) + b"OW\x00\x00" + struct.pack("<I", total))
        for frame in range(spec.frames):
            handle.write(_slice_pixels(phantom, spec.columns, frame))
