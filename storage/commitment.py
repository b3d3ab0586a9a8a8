"""Checking a storage commitment request: what we promise.

The check decides, once and for good, which of the instances a recorded
request references are committed: indexed, of the SOP class the requester
names, and their file present with the dataset's bytes still hashing to the
SHA-256 recorded at receipt. The index (storage.catalog.commitments) gives the
indexed copies and keeps the result; the files are read here, outside it.

The result also says what the request says about completeness: a series whose
referenced instances are all committed is `complete`, one with failures
`incomplete`, with the reason.
"""

from collections.abc import Callable
from pathlib import Path

from storage import files
from storage.catalog import Catalog, commitments
from storage.catalog.commitments import (
    CLASS_INSTANCE_CONFLICT,
    NO_SUCH_OBJECT_INSTANCE,
    PROCESSING_FAILURE,
    SOP_CLASS_NOT_SUPPORTED,
    CommitmentResult,
    IndexedCopy,
    Outcome,
    Reference,
    failures_by_name,
)


def check_request(
    catalog: Catalog,
    transaction_uid: str,
    is_storage_class: Callable[[str], bool],
    *,
    hold: float = 0.0,
) -> CommitmentResult:
    """Check every referenced instance (once: a checked transaction keeps its
    result) and record the result and what it says about completeness.

    `is_storage_class(uid)` tells a SOP class we would store from one of
    another service (reported as 0x0122 rather than 0x0112 when absent).
    `hold`: seconds during which retries leave the report to the caller (who
    delivers it on the requester's association).
    """
    referenced = commitments.referenced_copies(catalog, transaction_uid)
    if referenced is not None:
        data_dir = catalog.location.data_dir
        outcomes = [
            (position, *_check_instance(data_dir, reference, copy, is_storage_class))
            for position, reference, copy in referenced
        ]
        commitments.record_result(
            catalog, transaction_uid, outcomes, _completeness(transaction_uid, outcomes), hold
        )
    # Read back what was recorded: ours, or the result of a checker that got
    # there first, which is the one every report must carry.
    return commitments.load_result(catalog, transaction_uid)


def _check_instance(
    data_dir: Path,
    reference: Reference,
    copy: IndexedCopy | None,
    is_storage_class: Callable[[str], bool],
) -> tuple[int | None, str | None, str | None]:
    """(failure reason or None, study UID, series UID) of one referenced instance."""
    if copy is None:
        if not is_storage_class(reference.sop_class_uid):
            return SOP_CLASS_NOT_SUPPORTED, None, None
        return NO_SUCH_OBJECT_INSTANCE, None, None
    if copy.sop_class_uid != reference.sop_class_uid:
        return CLASS_INSTANCE_CONFLICT, copy.study_uid, copy.series_uid
    intact = files.holds_dataset(data_dir / copy.path, copy.sha256)
    return (None if intact else PROCESSING_FAILURE), copy.study_uid, copy.series_uid


def _completeness(transaction_uid: str, outcomes: list[Outcome]) -> dict[str, str | None]:
    """Each series of the request: None when complete, else why it is
    incomplete. A series all of whose referenced instances are committed is
    complete; a series with a failure is incomplete. A failure we cannot place
    in a series (an instance never received) makes every series of the request
    incomplete: any of them may be the one it belongs to."""
    unplaced = [reason for _, reason, _, series in outcomes if reason is not None and not series]
    per_series: dict[str, list[int | None]] = {}
    for _, reason, _, series in outcomes:
        if series:
            per_series.setdefault(series, []).append(reason)
    completeness: dict[str, str | None] = {}
    for series_uid, reasons in per_series.items():
        failures = [reason for reason in reasons if reason is not None] + unplaced
        if not failures:
            completeness[series_uid] = None
            continue
        total = len(reasons) + len(unplaced)
        kinds = failures_by_name(failures)
        detail = ", ".join(f"{count} {name}" for name, count in kinds.items())
        completeness[series_uid] = (
            f"commitment {transaction_uid}: {len(failures)} of {total} not committed ({detail})"
        )
    return completeness
