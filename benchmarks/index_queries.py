"""How the index and the admin CLI hold up at scale: 1,000,000 instances, 10,000 studies.

    .venv/bin/python -m benchmarks.index_queries [--instances N] [--studies M] [--runs R]

1. Fills an index in benchmarks/work/index-1m/ (reused when it already holds the
   same synthetic data) through the code path live ingest uses for the index:
   `Catalog.writing()`, then `stored_digest` and
   `index_instance(IndexEntry(...))` per instance, with `InstanceHeader`s built
   directly (no DICOM parsing, no files on disk). Instances are batched (5,000 per
   transaction) to make the fill fast; the figure reported is the index's own
   per-instance cost, and its rate over the first and the last 10,000 instances
   shows whether it grows with the index. Every run also probes that cost afresh:
   10,000 new instances indexed into an empty and into the filled index, rolled
   back (the fill's own figures suffer from whatever else the machine was doing).
2. Times admin commands as whole processes (`.venv/bin/imaging-scp ...`): wall
   clock of `subprocess.run`, one warm-up run (which checks the answer), then the
   median of R runs (5; 3 for a command slower than 15 s), with the process's CPU
   time beside it, steadier than wall clock on a shared machine.
   Targets (the issue): `studies --patient-id X` and `study UID` <= 200 ms,
   `stats` <= 500 ms, `export --format ndjson` of all studies >= 2,000 studies/s.
3. Records the start-up floor (python alone, `imaging-scp --help`, the imports
   of `scp.cli`) and the query plans of the index queries, to explain a miss.

Results: a table on stdout and benchmarks/results/index_queries.json.
"""

import argparse
import datetime
import json
import os
import platform
import random
import re
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "work"
RESULTS = HERE / "results"
VENV_BIN = Path(sys.executable).parent
CLI = str(VENV_BIN / "imaging-scp")
PYTHON = str(VENV_BIN / "python")

GENERATOR_VERSION = 1  # bump when the synthetic data changes: a kept index is then rebuilt
SEED = 20261122
BATCH = 5_000  # instances per write transaction during the fill
WINDOW = 10_000  # the "first / last N instances" of the fill rate
PROBE = 10_000  # instances indexed (and rolled back) into an empty and the filled index
SERIES_PER_STUDY = 4
STUDIES_PER_PATIENT = 5  # 10,000 studies -> ~2,000 patients
UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's: random UIDs, as generate_uid makes

SLOW_S, SLOW_RUNS = 15.0, 3  # a command slower than this is timed SLOW_RUNS times only
TARGET_MS = {"studies": 200.0, "study": 200.0, "stats": 500.0}
TARGET_EXPORT_STUDIES_PER_S = 2_000.0


# --- synthetic data -------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """A kind of study: its series' modalities and what its instances look like."""

    name: str
    weight: int
    modalities: tuple[str, ...]  # one per series, cycled
    sop_class: str
    size: int  # typical bytes per instance
    description: str
    body_part: str
    calling_ae: str


KINDS = (
    Kind("CT", 30, ("CT",), "1.2.840.10008.5.1.4.1.1.2", 530_000, "CT CHEST W/O CONTRAST",
         "CHEST", "CT_SCANNER1"),
    Kind("MR", 22, ("MR",), "1.2.840.10008.5.1.4.1.1.4", 270_000, "MRI BRAIN W/WO CONTRAST",
         "HEAD", "MR_3T"),
    Kind("CR", 15, ("CR",), "1.2.840.10008.5.1.4.1.1.1", 8_000_000, "XR CHEST 2 VIEWS",
         "CHEST", "CR_ROOM2"),
    Kind("DX", 10, ("DX",), "1.2.840.10008.5.1.4.1.1.1.1", 12_000_000, "XR KNEE 3 VIEWS",
         "KNEE", "DR_ROOM1"),
    Kind("US", 10, ("US",), "1.2.840.10008.5.1.4.1.1.6.1", 600_000, "US ABDOMEN COMPLETE",
         "ABDOMEN", "US_LOGIQ"),
    Kind("PT/CT", 6, ("PT", "PT", "CT", "CT"), "1.2.840.10008.5.1.4.1.1.128", 180_000,
         "PET/CT WHOLE BODY FDG", "WHOLEBODY", "PETCT_1"),
    Kind("MG", 7, ("MG",), "1.2.840.10008.5.1.4.1.1.1.2", 30_000_000,
         "MAMMO SCREENING BILATERAL", "BREAST", "MAMMO_1"),
)  # fmt: skip
SOP_CLASS_OF = {"CT": "1.2.840.10008.5.1.4.1.1.2"}  # the CT series of a PET/CT study

_SURNAMES = (
    "SMITH JOHNSON WILLIAMS BROWN JONES GARCIA MILLER DAVIS RODRIGUEZ MARTINEZ HERNANDEZ LOPEZ"
    " GONZALEZ WILSON ANDERSON THOMAS TAYLOR MOORE JACKSON MARTIN LEE PEREZ THOMPSON WHITE"
    " HARRIS SANCHEZ CLARK RAMIREZ LEWIS ROBINSON WALKER YOUNG ALLEN KING WRIGHT SCOTT TORRES"
    " NGUYEN HILL FLORES GREEN ADAMS NELSON BAKER HALL RIVERA CAMPBELL MITCHELL CARTER ROBERTS"
    " MULLER SCHMIDT SCHNEIDER FISCHER WEBER DUBOIS BERNARD ROSSI RUSSO SMITHSON"
)
_GIVEN_NAMES = (
    "JAMES MARY ROBERT PATRICIA JOHN JENNIFER MICHAEL LINDA DAVID ELIZABETH WILLIAM BARBARA"
    " RICHARD SUSAN JOSEPH JESSICA THOMAS SARAH CHARLES KAREN ANNA PETER LUCAS EMMA NOAH OLIVIA"
)
SURNAMES = _SURNAMES.split()
GIVEN_NAMES = _GIVEN_NAMES.split()
REFERRERS = ("HOUSE^GREGORY", "GREY^MEREDITH", "ROSS^DOUG", "QUINN^MICHAELA", "KILDARE^JAMES")
SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90")
RECEIVED_FROM = datetime.datetime(2025, 1, 6, 7, 0, tzinfo=datetime.UTC)


def _uid(rng: random.Random) -> str:
    return UID_PREFIX + str(rng.getrandbits(124))


def _iso(moment: datetime.datetime) -> str:
    """As storage.catalog.engines.utc_now writes received times."""
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def study_sizes(instances: int, studies: int) -> list[int]:
    base, extra = divmod(instances, studies)
    return [base + (1 if i < extra else 0) for i in range(studies)]


def generate(instances: int, studies: int, seed: int = SEED):
    """Yield (header, path, size, sha256, transfer_syntax, received_at, provenance),
    study after study and series after series, as a modality sends them.
    Deterministic for a given (instances, studies)."""
    from storage.catalog import Provenance
    from storage.files import instance_relpath
    from storage.header import InstanceHeader

    rng = random.Random(seed)
    patients = max(1, studies // STUDIES_PER_PATIENT)
    people = []
    for p in range(patients):
        birth = datetime.date(1930, 1, 1) + datetime.timedelta(days=rng.randrange(365 * 90))
        people.append(
            {
                "patient_id": f"MRN{1_000_000 + p * 7:08d}",
                "issuer_of_patient_id": "HOSP",
                "patient_name": f"{rng.choice(SURNAMES)}^{rng.choice(GIVEN_NAMES)}",
                "patient_birth_date": birth.strftime("%Y%m%d"),
                "patient_sex": rng.choice("MF"),
            }
        )
    weights = [k.weight for k in KINDS]
    received = RECEIVED_FROM
    for number, count in enumerate(study_sizes(instances, studies)):
        kind = rng.choices(KINDS, weights)[0]
        # A study every ~6 minutes (working hours are not modelled); a tenth are
        # priors pulled from an archive, dated months or years before.
        received += datetime.timedelta(seconds=rng.randrange(60, 660))
        if rng.random() < 0.1:
            performed = received - datetime.timedelta(days=rng.randrange(30, 2000))
        else:
            performed = received - datetime.timedelta(minutes=rng.randrange(5, 90))
        study_uid = _uid(rng)
        study = {
            **rng.choice(people),
            "study_date": performed.strftime("%Y%m%d"),
            "study_time": performed.strftime("%H%M%S"),
            "timezone_offset": None,
            "accession": f"A{performed.year}{number:07d}",
            "accession_issuer": None,
            "study_id": str(number % 100_000),
            "description": kind.description,
            "referrer": rng.choice(REFERRERS),
            "interpreter": None,
            "procedure_codes": json.dumps(
                [
                    {
                        "code": f"RPID{KINDS.index(kind) + 1}",
                        "system": "RADLEX",
                        "display": kind.description,
                    }
                ]
            ),  # fmt: skip
            "reason": None,
            "institution": "GENERAL HOSPITAL",
            "department": "RADIOLOGY",
        }
        syntax = rng.choice(SYNTAXES)
        provenance = Provenance(
            calling_ae=kind.calling_ae,
            called_ae="IMAGING_SCP",
            peer=f"10.1.{KINDS.index(kind)}.{10 + number % 5}:{30000 + rng.randrange(30000)}",
            association_id=f"bench-{number + 1}",
        )
        series_count = min(SERIES_PER_STUDY, count)
        per_series = study_sizes(count, series_count) if series_count else []
        for s, in_series in enumerate(per_series):
            modality = kind.modalities[s % len(kind.modalities)]
            series_uid = _uid(rng)
            series = {
                "modality": modality,
                "number": s + 1,
                "description": f"{kind.description} {s + 1}",
                "body_part": kind.body_part,
                "laterality": None,
                "series_date": study["study_date"],
                "series_time": study["study_time"],
                "performer": "TECH^TERRY",
            }
            sop_class = SOP_CLASS_OF.get(modality, kind.sop_class)
            for k in range(in_series):
                received += datetime.timedelta(milliseconds=rng.randrange(50, 400))
                sop_uid = _uid(rng)
                header = InstanceHeader(
                    sop_class_uid=sop_class,
                    sop_instance_uid=sop_uid,
                    study_uid=study_uid,
                    series_uid=series_uid,
                    study=study,
                    series=series,
                    instance={"number": k + 1, "title": None, "number_of_frames": None},
                )
                yield (
                    header,
                    str(instance_relpath(study_uid, series_uid, sop_uid)),
                    kind.size + rng.randrange(-kind.size // 20, kind.size // 20 + 1),
                    f"{rng.getrandbits(256):064x}",
                    syntax,
                    _iso(received),
                    provenance,
                )


# --- the fill -------------------------------------------------------------------


def data_dir_for(instances: int, studies: int) -> Path:
    if (instances, studies) == (1_000_000, 10_000):
        return WORK / "index-1m"
    return WORK / f"index-{instances}i-{studies}s"


def _fill_params(instances: int, studies: int) -> dict:
    return {
        "instances": instances,
        "studies": studies,
        "generator": GENERATOR_VERSION,
        "seed": SEED,
        "batch": BATCH,
    }


def kept_fill(data_dir: Path, instances: int, studies: int) -> dict | None:
    """The record of an earlier fill of the same data, if its index is intact."""
    meta_path = data_dir / "fill.json"
    index_path = data_dir / "index.sqlite"
    if not (meta_path.is_file() and index_path.is_file()):
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("params") != _fill_params(instances, studies):
        return None
    conn = sqlite3.connect(f"file:{index_path}?mode=ro", uri=True)
    try:
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM instances), (SELECT count(*) FROM studies)"
        ).fetchone()
    finally:
        conn.close()
    return meta if counts == (instances, studies) else None


def fill(data_dir: Path, instances: int, studies: int) -> dict:
    """Build the index under a temporary name, then move it into place."""
    from storage.catalog import Catalog, IndexEntry
    from storage.catalog.engines import IndexLocation

    partial = data_dir.with_name(data_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(data_dir, ignore_errors=True)
    partial.mkdir(parents=True)
    index = Catalog.open(IndexLocation(partial))
    batches = []  # (instances in the batch, seconds inside Catalog.writing())
    started = time.perf_counter()
    rows = generate(instances, studies)
    done = 0
    last_report = started
    while done < instances:
        entries = []
        for header, path, size, sha256, syntax, received_at, provenance in rows:
            entries.append(IndexEntry(header, path, size, sha256, syntax, received_at, provenance))
            if len(entries) == BATCH:
                break
        t0 = time.perf_counter()
        with index.writing():
            _index_batch(index, entries)
        batches.append((len(entries), time.perf_counter() - t0))
        done += len(entries)
        now = time.perf_counter()
        if now - last_report >= 15 or done == instances:
            recent = sum(n for n, _ in batches[-4:]) / sum(s for _, s in batches[-4:])
            print(
                f"  filled {done:,}/{instances:,} instances, {now - started:.0f} s"
                f" (index: {recent:,.0f} instances/s over the last batches)",
                flush=True,
            )
            last_report = now
    wall = time.perf_counter() - started
    index.close()  # the last connection checkpoints the WAL into the database
    size = (partial / "index.sqlite").stat().st_size
    partial.rename(data_dir)
    in_index = sum(s for _, s in batches)
    result = {
        "params": _fill_params(instances, studies),
        "filled_at": _iso(datetime.datetime.now(datetime.UTC)),
        "wall_seconds": round(wall, 2),
        "index_seconds": round(in_index, 2),
        "instances_per_s_wall": round(instances / wall),
        "instances_per_s_index": round(instances / in_index),
        "first_window": _window_rate(batches, first=True),
        "last_window": _window_rate(batches, first=False),
        "deciles_instances_per_s": _deciles(batches),
        "index_bytes": size,
    }
    (data_dir / "fill.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _window_rate(batches: list[tuple[int, float]], *, first: bool) -> dict:
    """The index rate over the first (or last) WINDOW instances, whole batches."""
    ordered = batches if first else list(reversed(batches))
    count = seconds = 0
    for n, s in ordered:
        if count >= WINDOW:
            break
        count += n
        seconds += s
    return {
        "instances": count,
        "seconds": round(seconds, 3),
        "instances_per_s": round(count / seconds),
    }


class _Rollback(Exception):
    """Raised inside Catalog.writing() to undo a probe."""


def _index_batch(index, entries) -> None:
    """What storage.store.Store._place does for a new instance, inside writing()."""
    for entry in entries:
        header = entry.header
        if index.stored_digest(header.sop_instance_uid) is not None:
            raise RuntimeError(f"duplicate synthetic UID {header.sop_instance_uid}")
        index.index_instance(entry)  # checks the series' study first


def probe_growth(data_dir: Path, probes: int = 3) -> dict:
    """Catalog PROBE new instances (100 new studies) into an empty index and into
    the filled one, in one transaction each time, rolled back so the filled index
    stays as it is. The best of `probes` tries, wall and CPU: the per-instance
    cost at 0 and at N instances, free of the fill's history."""
    from storage.catalog import Catalog, IndexEntry
    from storage.catalog.engines import IndexLocation

    entries = [IndexEntry(*row) for row in generate(PROBE, PROBE // 100, seed=SEED + 1)]
    empty_dir = WORK / "index-probe-empty"
    shutil.rmtree(empty_dir, ignore_errors=True)
    empty_dir.mkdir(parents=True)
    result = {}
    for name, where in (("empty", empty_dir), ("filled", data_dir)):
        index = Catalog.open(IndexLocation(where))
        walls, cpus = [], []
        for _ in range(probes):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                with index.writing():
                    _index_batch(index, entries)
                    walls.append(time.perf_counter() - wall)
                    cpus.append(time.process_time() - cpu)
                    raise _Rollback
            except _Rollback:
                pass
        index.close()
        result[name] = {
            "instances": PROBE,
            "us_per_instance_wall": round(min(walls) / PROBE * 1e6, 1),
            "us_per_instance_cpu": round(min(cpus) / PROBE * 1e6, 1),
            "instances_per_s_wall": round(PROBE / min(walls)),
        }
    shutil.rmtree(empty_dir, ignore_errors=True)
    return result


def _deciles(batches: list[tuple[int, float]]) -> list[int]:
    """Catalog rate over each tenth of the batches: does the per-instance cost grow?"""
    tenth = max(1, len(batches) // 10)
    rates = []
    for i in range(0, len(batches), tenth):
        chunk = batches[i : i + tenth]
        rates.append(round(sum(n for n, _ in chunk) / sum(s for _, s in chunk)))
    return rates


# --- the timed commands ---------------------------------------------------------


@dataclass
class Case:
    key: str
    args: list[str]
    target_ms: float | None = None  # at most, per run
    target_studies_per_s: float | None = None  # at least (export)
    counts_studies: bool = False  # export: report studies/s (and instances/s)
    note: str = ""


def pick_examples(conn: sqlite3.Connection) -> dict:
    """An existing patient, its name's surname, and a study in the middle of the index."""
    total = conn.execute("SELECT count(*) FROM studies").fetchone()[0]
    study_uid, patient_id = conn.execute(
        "SELECT study_uid, patient_id FROM studies ORDER BY last_received LIMIT 1 OFFSET ?",
        (total // 2,),
    ).fetchone()
    return {
        "study_uid": study_uid,
        "patient_id": patient_id,
        "patient_studies": conn.execute(
            "SELECT count(*) FROM studies WHERE patient_id = ?", (patient_id,)
        ).fetchone()[0],
        "smith_studies": conn.execute(
            "SELECT count(*) FROM studies WHERE patient_name LIKE 'SMITH%'"
        ).fetchone()[0],
        "studies": total,
        "instances": conn.execute("SELECT sum(number_of_instances) FROM studies").fetchone()[0],
    }


def cases(examples: dict) -> list[Case]:
    pid, uid = examples["patient_id"], examples["study_uid"]
    studies_ms, study_ms, stats_ms = (TARGET_MS[k] for k in ("studies", "study", "stats"))
    return [
        Case("python -c pass", [PYTHON, "-c", "pass"], note="interpreter start-up floor"),
        Case("imaging-scp --help", [CLI, "--help"], note="start-up + imports of scp.cli"),
        Case(f"studies --patient-id {pid}", ["studies", "--patient-id", pid], studies_ms),
        Case(f"studies --patient-id {pid} --json", ["studies", "--patient-id", pid, "--json"],
             studies_ms),
        Case("study UID", ["study", uid], study_ms),
        Case("study UID --json", ["study", uid, "--json"], study_ms),
        Case("stats", ["stats"], stats_ms),
        Case("stats --json", ["stats", "--json"], stats_ms),
        Case("studies --limit 50", ["studies", "--limit", "50"], note="no target in the issue"),
        Case('studies --patient-name "SMITH*"', ["studies", "--patient-name", "SMITH*"],
             note=f"no target; {examples['smith_studies']} studies match"),
        Case("study UID --instances", ["study", uid, "--instances"],
             note="no target; lists the study's instances"),
        Case("export --format ndjson -o /dev/null",
             ["export", "--format", "ndjson", "-o", "/dev/null"],
             target_studies_per_s=TARGET_EXPORT_STUDIES_PER_S, counts_studies=True),
        Case("export --format ndjson --instances -o /dev/null",
             ["export", "--format", "ndjson", "--instances", "-o", "/dev/null"],
             counts_studies=True, note="no target in the issue"),
    ]  # fmt: skip


def command_line(case: Case, data_dir: Path) -> list[str]:
    if case.args[0] in (PYTHON, CLI):
        return case.args
    return [CLI, *case.args, "--data-dir", str(data_dir)]


def check_output(case: Case, data_dir: Path, examples: dict) -> str:
    """Run once and check the answer is the right one (this is also the warm-up run).
    Exports write to a pipe here, to count what they produce; timed runs use -o /dev/null."""
    cmd = command_line(case, data_dir)
    if case.counts_studies:
        cmd = [c if c != "/dev/null" else "-" for c in cmd]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
    out = proc.stdout
    if case.counts_studies:
        lines = out.splitlines()
        if len(lines) != examples["studies"]:
            raise RuntimeError(f"{case.key}: {len(lines)} resources, not {examples['studies']}")
        if "--instances" in case.args:
            first = json.loads(lines[0])
            listed = sum(len(s.get("instance", [])) for s in first["series"])
            if listed != first["numberOfInstances"]:
                raise RuntimeError(f"{case.key}: {listed} instances listed in the first study")
        return f"{len(lines):,} resources, {len(out) / 1e6:,.0f} MB, warm-up {seconds:.1f} s"
    if case.key.startswith("studies --patient-id") and case.key.endswith("--json"):
        found = len(json.loads(out))
        if found != examples["patient_studies"]:
            raise RuntimeError(f"{case.key}: {found} studies, not {examples['patient_studies']}")
        return f"{found} studies"
    if case.key == "study UID --json" and json.loads(out)["uid"] != examples["study_uid"]:
        raise RuntimeError(f"{case.key}: another study came back")
    if case.key == "stats --json" and json.loads(out)["instances"] != examples["instances"]:
        raise RuntimeError(f"{case.key}: wrong instance total")
    return f"{out.count(chr(10))} lines of output"


def time_case(case: Case, data_dir: Path, runs: int) -> tuple[list[float], list[float]]:
    """Wall seconds of each run, and the CPU seconds (user + system) the process used:
    on a shared machine the CPU time is the steadier of the two."""
    cmd = command_line(case, data_dir)
    wall, cpu = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, cwd=REPO)
        wall.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}")
    return wall, cpu


def judge(case: Case, median_s: float, examples: dict) -> dict:
    row = {"median_ms": round(median_s * 1000, 1)}
    if case.counts_studies:
        row["studies_per_s"] = round(examples["studies"] / median_s)
        if "--instances" in case.args:
            row["instances_per_s"] = round(examples["instances"] / median_s)
    if case.target_ms is not None:
        row["target"] = f"<= {case.target_ms:.0f} ms"
        row["pass"] = median_s * 1000 <= case.target_ms
    elif case.target_studies_per_s is not None:
        row["target"] = f">= {case.target_studies_per_s:,.0f} studies/s"
        row["pass"] = row["studies_per_s"] >= case.target_studies_per_s
    else:
        row["target"] = None
        row["pass"] = None
    return row


# --- diagnosis ------------------------------------------------------------------


def import_profile() -> dict:
    """What `import scp.cli` costs, its heaviest top-level imports, and whether
    pydicom (0.15 s+) comes with it."""
    probe = (
        "import sys, time; t = time.perf_counter(); import scp.cli;"
        " print(time.perf_counter() - t);"
        " print(','.join(sorted({m.split('.')[0] for m in sys.modules}"
        " & {'pydicom', 'pynetdicom', 'sqlite_utils', 'structlog', 'numpy'})))"
    )
    proc = subprocess.run(
        [PYTHON, "-X", "importtime", "-c", probe], capture_output=True, text=True, cwd=REPO
    )
    seconds, heavy = proc.stdout.splitlines()[:2]
    # "import time: self | cumulative | name"; direct imports of scp.* and storage.*
    # modules (indent 2-3) show who pulls in what.
    rows = []
    for line in proc.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( +)(\S+)", line)
        if match:
            rows.append((int(match.group(2)), len(match.group(3)), match.group(4)))
    chains = []
    parent_of_depth: dict[int, str] = {}
    for cumulative, depth, name in reversed(rows):  # importtime prints children first
        parent_of_depth[depth] = name
        if name.split(".")[0] in ("pydicom", "pynetdicom", "sqlite_utils") and cumulative > 20_000:
            parent = parent_of_depth.get(depth - 2)
            chains.append({"module": name, "ms": round(cumulative / 1000), "imported_by": parent})
    return {
        "import_scp_cli_ms": round(float(seconds) * 1000),
        "heavy_packages_loaded": heavy.split(",") if heavy else [],
        "heavy_imports": chains[:8],
    }


QUERIES = {
    "studies --patient-id (iter_studies)": (
        "SELECT s.* FROM studies s WHERE patient_id = ? ORDER BY s.last_received DESC",
        "patient_id",
    ),
    "incomplete_reason subquery (every study row)": (
        "SELECT x.incomplete_reason FROM series x WHERE x.study_uid = ?"
        " AND x.incomplete_reason IS NOT NULL LIMIT 1",
        "study_uid",
    ),
    "series_of": (
        "SELECT * FROM series WHERE study_uid IN (?) ORDER BY number IS NULL, number,"
        " first_received",
        "study_uid",
    ),
    "series_of with_instances": (
        "SELECT * FROM instances WHERE study_uid IN (?)"
        " ORDER BY number IS NULL, number, received_at",
        "study_uid",
    ),
    "stats totals": (
        "SELECT count(DISTINCT patient_id), count(*), sum(number_of_series),"
        " sum(number_of_instances), sum(bytes), max(last_received) FROM studies",
        None,
    ),
    "stats per modality": (
        "SELECT coalesce(modality, ''), count(DISTINCT study_uid), count(*),"
        " sum(number_of_instances), sum(bytes) FROM series GROUP BY 1 ORDER BY 4 DESC",
        None,
    ),
    "studies --patient-name": (
        "SELECT s.* FROM studies s WHERE patient_name LIKE ? ESCAPE '\\'"
        " ORDER BY s.last_received DESC",
        "name",
    ),
}


def query_plans(data_dir: Path, examples: dict) -> dict:
    """EXPLAIN QUERY PLAN and in-process time of the SQL the commands run."""
    conn = sqlite3.connect(f"file:{data_dir / 'index.sqlite'}?mode=ro", uri=True)
    values = {
        "patient_id": examples["patient_id"],
        "study_uid": examples["study_uid"],
        "name": "SMITH%",
    }
    plans = {}
    for name, (sql, param) in QUERIES.items():
        params = (values[param],) if param else ()
        plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]
        started = time.perf_counter()
        conn.execute(sql, params).fetchall()
        plans[name] = {"plan": plan, "ms": round((time.perf_counter() - started) * 1000, 1)}
    conn.close()
    return plans


# --- report ---------------------------------------------------------------------


def print_fill(result: dict, reused: bool) -> None:
    first, last = result["first_window"], result["last_window"]
    how = f"kept from the fill of {result['filled_at']}" if reused else "this run"
    params = result["params"]
    print(f"\nFill ({how}): {params['instances']:,} instances, {params['studies']:,} studies,"
          f" {BATCH:,} instances per transaction")  # fmt: skip
    print(f"  wall {result['wall_seconds']:.0f} s: {result['instances_per_s_wall']:,} instances/s"
          f" (synthetic headers included)")  # fmt: skip
    print(f"  inside Catalog.writing(): {result['instances_per_s_index']:,} instances/s"
          f" ({1e6 / result['instances_per_s_index']:.0f} us per instance)")  # fmt: skip
    print(f"  first {first['instances']:,}: {first['instances_per_s']:,} instances/s;"
          f" last {last['instances']:,}: {last['instances_per_s']:,} instances/s"
          f" (ratio {last['instances_per_s'] / first['instances_per_s']:.2f})")  # fmt: skip
    deciles = ", ".join(f"{r:,}" for r in result["deciles_instances_per_s"])
    print(f"  per tenth of the fill: {deciles} instances/s")
    print(f"  index.sqlite: {result['index_bytes'] / 1e6:,.0f} MB")


def print_table(rows: list[dict]) -> None:
    headers = ["command", "median", "min", "max", "cpu", "rate", "target", "result"]
    cells = []
    for row in rows:
        rate = ""
        if "studies_per_s" in row:
            rate = f"{row['studies_per_s']:,} studies/s"
            if "instances_per_s" in row:
                rate += f", {row['instances_per_s']:,} inst/s"
        result = {True: "PASS", False: "FAIL", None: row.get("note") or "-"}[row["pass"]]
        cells.append(
            [row["command"], f"{row['median_ms']:,.0f} ms", f"{row['min_ms']:,.0f}",
             f"{row['max_ms']:,.0f}", f"{row['cpu_median_ms']:,.0f} ms", rate,
             row["target"] or "-", result]
        )  # fmt: skip
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)).rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=1_000_000)
    parser.add_argument("--studies", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per command (median)")
    parser.add_argument("--refill", action="store_true", help="rebuild the index even if kept")
    parser.add_argument("--fill-only", action="store_true", help="fill (or check) and stop")
    args = parser.parse_args()
    if not 0 < args.studies <= args.instances:
        parser.error("need 0 < --studies <= --instances")

    data_dir = data_dir_for(args.instances, args.studies)
    sys.path.insert(0, str(REPO))
    fill_result = None if args.refill else kept_fill(data_dir, args.instances, args.studies)
    reused = fill_result is not None
    if not reused:
        print(f"Filling {data_dir} ...", flush=True)
        fill_result = fill(data_dir, args.instances, args.studies)
    print_fill(fill_result, reused)
    growth = probe_growth(data_dir)
    empty, filled = growth["empty"], growth["filled"]
    print(f"  probe, {PROBE:,} new instances in one transaction (rolled back), best of 3:")
    for name, probe in (("empty index", empty), (f"at {args.instances:,}", filled)):
        print(f"    {name}: {probe['us_per_instance_wall']} us/instance wall,"
              f" {probe['us_per_instance_cpu']} us CPU")  # fmt: skip
    if args.fill_only:
        return

    conn = sqlite3.connect(f"file:{data_dir / 'index.sqlite'}?mode=ro", uri=True)
    examples = pick_examples(conn)
    conn.close()
    print(f"\nExamples: patient {examples['patient_id']} ({examples['patient_studies']} studies),"
          f" study {examples['study_uid']}")  # fmt: skip
    print(f"Timing whole processes ({CLI}): wall clock of subprocess.run, stdout to a pipe,"
          f" 1 warm-up run (which checks the answer), median of {args.runs} runs.\n",
          flush=True)  # fmt: skip

    rows = []
    for case in cases(examples):
        warm_up_started = time.perf_counter()
        checked = check_output(case, data_dir, examples)
        runs = args.runs
        if time.perf_counter() - warm_up_started > SLOW_S:
            runs = min(runs, SLOW_RUNS)
            checked += f"; median of {runs} runs only (slow)"
        seconds, cpu = time_case(case, data_dir, runs)
        median = statistics.median(seconds)
        row = {
            "command": case.key,
            "argv": command_line(case, data_dir),
            "runs_ms": [round(s * 1000, 1) for s in seconds],
            "min_ms": round(min(seconds) * 1000, 1),
            "max_ms": round(max(seconds) * 1000, 1),
            "cpu_median_ms": round(statistics.median(cpu) * 1000, 1),
            "checked": checked,
            "note": case.note,
            **judge(case, median, examples),
        }
        rows.append(row)
        print(f"  {case.key}: {row['median_ms']:,.0f} ms ({checked})", flush=True)

    print()
    print_table(rows)

    imports = import_profile()
    plans = query_plans(data_dir, examples)
    print(
        f"\nimport scp.cli: {imports['import_scp_cli_ms']} ms in-process;"
        f" heavy packages loaded: {', '.join(imports['heavy_packages_loaded']) or 'none'}"
    )
    for chain in imports["heavy_imports"]:
        print(f"  {chain['module']} ({chain['ms']} ms) imported by {chain['imported_by']}")
    print("\nQuery plans (in-process time of one run):")
    for name, info in plans.items():
        flag = "  <- full scan" if any(p.startswith("SCAN") for p in info["plan"]) else ""
        print(f"  {name}: {info['ms']} ms; {' / '.join(info['plan'])}{flag}")

    failed = [r["command"] for r in rows if r["pass"] is False]
    print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'All targets met.'}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "index_queries.json"
    out.write_text(
        json.dumps(
            {
                "date": _iso(datetime.datetime.now(datetime.UTC)),
                "host": {
                    "platform": platform.platform(),
                    "python": platform.python_version(),
                    "sqlite": sqlite3.sqlite_version,
                    "cpus": os.cpu_count(),
                },
                "method": f"whole processes, wall clock, 1 warm-up then median of {args.runs}",
                "data_dir": str(data_dir),
                "fill": {**fill_result, "reused": reused},
                "index_cost_probe": growth,
                "examples": examples,
                "commands": rows,
                "imports": imports,
                "query_plans": plans,
                "failed": failed,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"Results: {out}")


if __name__ == "__main__":
    main()
