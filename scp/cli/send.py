"""`imaging-scp send`: push a study or a series the index holds to a DICOM peer,
with the requestor and the sub-operations of C-MOVE (scp.sub_operations)."""

import contextlib
import json
import time

import click

from scp.cli.admin import _config, _progress, _reader, data_options, json_option
from scp.cli.options import EXIT_NOT_FOUND, EXIT_USAGE, fail
from scp.config import peer_address


@click.command()
@click.option("--study", "study_uid", help="every instance of this study")
@click.option("--series", "series_uid", help="every instance of this series")
@click.option("--to", "called_ae", help="the peer's AE title (its address from `peers`)")
@click.option("--host", help="the peer's host, when it is not in `peers`")
@click.option("--port", type=click.IntRange(1, 65535), help="the peer's port, with --host")
@click.option("--aet", help="our AE title [default: aet from --config]")
@click.option("--timeout", type=float, default=30.0, show_default=True,
              help="seconds to wait for the connection and for each answer")  # fmt: skip
@json_option("a summary: sent, failed with reasons")
@data_options
def send(
    config_file, data_dir, index_url, study_uid, series_uid, called_ae, host, port, aet,
    timeout, as_json,
):  # fmt: skip
    """Send a study or a series to a DICOM peer, each instance as it was received.

    The peer is --to AE, found in `peers`, or --host and --port (called as --to,
    or ANY-SCP). Exit 0 when every instance was stored, 1 when any failed or
    nothing matched, 2 on a usage error.
    """
    from scp.sub_operations import (
        Destination,
        DestinationLost,
        Matches,
        Unsendable,
        proposals,
        store_failure,
    )
    from scp.upper_layer import AssociationError, Requestor
    from storage.catalog import find

    if (study_uid is None) == (series_uid is None):
        fail("give exactly one of --study UID or --series UID", EXIT_USAGE)
    config = _config(config_file, data_dir, index_url)
    if host is None and port is None:
        if called_ae is None:
            fail("give --to AE (from peers), or --host and --port", EXIT_USAGE)
        address = peer_address(config, called_ae)
        if address is None:
            fail(f"no address for AE {called_ae!r}: add it to peers, or give --host and --port",
                 EXIT_USAGE)  # fmt: skip
        host, port = address
    elif host is None or port is None:
        fail("give --host and --port together", EXIT_USAGE)
    called_ae = called_ae or "ANY-SCP"
    level, keyword, uid = (
        (find.STUDY, "StudyInstanceUID", study_uid)
        if study_uid
        else (find.SERIES, "SeriesInstanceUID", series_uid)
    )
    query = find.Query(find.STUDY_ROOT, level, {keyword: uid})
    reader = _reader(config)
    sent, warnings, failed = 0, 0, []
    started = time.monotonic()
    try:
        contents = reader.retrieve_contents(query)
        matches = sum(contents.values())
        if not matches:
            fail(f"no {level.lower()} {uid} in the index", EXIT_NOT_FOUND)
        requestor = Requestor(aet or config.aet, timeout=timeout)
        wanted = proposals(contents)
        try:
            destination = Destination(lambda: requestor.associate(host, port, called_ae, wanted))
        except AssociationError as exc:
            fail(str(exc), EXIT_NOT_FOUND)
        rows = Matches(config.data_dir, reader.retrieve(query))
        with (
            contextlib.closing(destination),
            contextlib.closing(rows),
            _progress(f"{called_ae}@{host}:{port}", matches) as bar,
        ):
            for match in rows:
                instance = match.instance
                try:
                    status, comment = destination.store(match, rows.check_ahead)
                except (Unsendable, AssociationError) as exc:  # the next goes on
                    failed.append((instance.sop_instance_uid, str(exc)))
                except DestinationLost as exc:
                    failed.append((instance.sop_instance_uid, str(exc)))
                    failed += [(left.sop_instance_uid, str(exc)) for left in rows.unsent()]
                    break
                else:
                    why = store_failure(status, comment)
                    if why is not None:
                        failed.append((instance.sop_instance_uid, why))
                    elif status:
                        warnings += 1
                    else:
                        sent += 1
                bar.update(1)
    finally:
        reader.close()
    seconds = time.monotonic() - started
    if as_json:
        summary = {
            "destination": f"{called_ae}@{host}:{port}",
            "matches": matches,
            "sent": sent + warnings,
            "warnings": warnings,
            "failed": [{"sopInstanceUid": uid, "reason": why} for uid, why in failed],
            "seconds": round(seconds, 3),
        }
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(
            f"{called_ae}@{host}:{port}: {sent + warnings} of {matches} sent"
            f" ({warnings} with warnings), {len(failed)} failed in {seconds:.1f} s"
        )
        for failed_uid, why in failed:
            click.echo(f"failed {failed_uid}: {why}", err=True)
    if failed:
        raise SystemExit(EXIT_NOT_FOUND)
