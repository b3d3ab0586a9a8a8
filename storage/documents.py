"""The index's answers as JSON documents, as every admin command prints them
with `--json`: ImagingStudy element names where FHIR has one (`uid`,
`numberOfSeries`, `series[].instance[]`, …), camelCase names of our own
beside them (`state`, `incompleteReason`, `bytes`, …). Empty values are left out.
Which indexed attributes are shown as the index holds them, and by which name,
is said in their list (storage.attributes, `json`).
"""

import json

from storage.attributes import INSTANCE, PATIENT, SERIES, STUDY, Attribute, shown

_STUDY_SHOWN = shown(PATIENT, STUDY)
_SERIES_SHOWN = shown(SERIES)
_INSTANCE_SHOWN = shown(INSTANCE)


def modalities_of(study: dict) -> list[str]:
    """A study row's modalities, in the order they first arrived."""
    return json.loads(study.get("modalities") or "[]")


def study_json(study: dict) -> dict:
    """A study in ImagingStudy element names, plus our own fields."""
    return _without_none(
        {
            **_as_indexed(study, _STUDY_SHOWN),
            "patient": _without_none({"id": study["patient_id"], "name": study["patient_name"]})
            or None,
            "started": _joined(study["study_date"], study["study_time"]),
            "dateAsSent": study.get("study_date_raw"),
            "timeAsSent": study.get("study_time_raw"),
            "modality": modalities_of(study),
            "numberOfSeries": study["number_of_series"],
            "numberOfInstances": study["number_of_instances"],
            "availability": study["availability"],
            "state": study["state"],
            "incompleteReason": study["incomplete_reason"],
            "bytes": study["bytes"],
            "firstReceived": study["first_received"],
            "lastReceived": study["last_received"],
            "series": [series_json(s) for s in study["series"]] if "series" in study else None,
        }
    )


def series_json(series: dict) -> dict:
    return _without_none(
        {
            **_as_indexed(series, _SERIES_SHOWN),
            "started": _joined(series["series_date"], series["series_time"]),
            "dateAsSent": series.get("series_date_raw"),
            "timeAsSent": series.get("series_time_raw"),
            "numberOfInstances": series["number_of_instances"],
            "availability": series["availability"],
            "state": series["state"],
            "incompleteReason": series["incomplete_reason"],
            "committedAt": series["committed_at"],
            "bytes": series["bytes"],
            "firstReceived": series["first_received"],
            "lastReceived": series["last_received"],
            "instance": [instance_json(i) for i in series["instances"]]
            if "instances" in series
            else None,
        }
    )


def instance_json(instance: dict) -> dict:
    return _without_none(
        {
            **_as_indexed(instance, _INSTANCE_SHOWN),
            "path": instance["path"],
            "size": instance["size"],
            "sha256": instance["sha256"],
            "transferSyntax": instance["transfer_syntax"],
            "receivedAt": instance["received_at"],
            "callingAe": instance["calling_ae"],
            "peer": instance["peer"],
            "association": instance["association_id"],
        }
    )


def dicom_json(match: dict, vrs: dict[str, tuple[int, str]]) -> dict:
    """A C-FIND match (keyword -> value, storage.catalog.find) as a PS3.18 F.2
    DICOM JSON object; `vrs`: keyword -> (tag, VR). Empty values keep their VR."""
    document = {}
    for keyword, value in sorted(match.items(), key=lambda item: vrs[item[0]][0]):
        tag, vr = vrs[keyword]
        element = {"vr": vr}
        values = value if isinstance(value, list) else [] if value in (None, "") else [value]
        if vr == "PN":
            values = [{"Alphabetic": name} for name in values]
        elif vr == "IS":
            values = [int(number) for number in values]
        if values:
            element["Value"] = values
        document[f"{tag:08X}"] = element
    return document


def _as_indexed(row: dict, attributes: list[Attribute]) -> dict:
    return {attribute.json: row[attribute.column] for attribute in attributes}


def _joined(day: str | None, clock: str | None) -> str | None:
    """DICOM date and time as ISO 8601 local time (no offset: DICOM rarely has one)."""
    if not day:
        return None
    text = date_text(day)
    digits = (clock or "").split(".")[0]
    if len(digits) >= 4 and digits.isdigit():
        text += f"T{digits[:2]}:{digits[2:4]}:{digits[4:6] or '00'}"
    return text


def _without_none(values: dict) -> dict:
    return {key: value for key, value in values.items() if value is not None}


def date_text(value: str | None) -> str:
    """An indexed date (YYYYMMDD) as people read it: 2026-11-22."""
    if value and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value or ""


def camel_keys(value):
    """The index's snake_case names as the JSON of every command spells them."""
    if isinstance(value, dict):
        return {_camel(key): camel_keys(item) for key, item in value.items()}
    if isinstance(value, list):
        return [camel_keys(item) for item in value]
    return value


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def conflict_json(found: dict) -> dict:
    return _without_none(
        {
            "sopInstanceUid": found["sop_instance_uid"],
            "action": found["action"],
            "path": found["path"],
            "size": found["size"],
            "sha256": found["sha256"],
            "receivedAt": found["received_at"],
            "callingAe": found["calling_ae"],
            "peer": found["peer"],
            "association": found["association_id"],
            "study": found["study_uid"],
            "series": found["series_uid"],
            "reason": found["reason"],
        }
    )


def commitment_json(found: dict) -> dict:
    return _without_none(
        {
            "transactionUid": found["transaction_uid"],
            "requester": found["requester_ae"],
            "peer": found["requester_peer"],
            "received": found["requested_at"],
            "instances": found["instances"],
            "committed": found["committed"],
            "failed": found["failed"],
            "checked": found["checked_at"],
            "delivery": found["delivery_state"],
            "deliveredBy": found["delivered_by"],
            "deliveredAt": found["delivered_at"],
            "attempts": found["attempts"],
            "nextAttempt": found["next_attempt_at"]
            if found["delivery_state"] in ("pending", "delivering")
            else None,
            "lastError": found["last_error"],
            "studies": found["studies"],
        }
    )
