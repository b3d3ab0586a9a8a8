"""Admin commands over the index: a thin layer over the catalog's reader
(`storage.catalog.reads.CatalogReader`) and `storage.maintenance`. Every
command reads the index directly (it works while `serve` runs), prints a table
for people and `--json` for scripts, and exits 0 on success, 1 when something
is not found, 2 on a usage error.
"""

import dataclasses
import functools
import json
import shutil
import sys
from pathlib import Path

import click

from scp.cli.options import (
    EXIT_NOT_FOUND,
    EXIT_USAGE,
    config_file_option,
    effective_config,
    fail,
)
from storage.catalog.engines import (
    IndexBusy,
    IndexCorrupt,
    IndexFailed,
    IndexLocation,
    IndexUnreachable,
    engine_failures,
)
from storage.catalog.reads import CatalogReader, FilterError, StudyFilter
from storage.documents import (
    camel_keys,
    commitment_json,
    conflict_json,
    date_text,
    modalities_of,
    study_json,
)

# --- options shared by the commands ------------------------------------------


def data_options(command):
    """`--config FILE`, `--data-dir DIR` and `--index-url URL`, as `serve` takes
    them. A damaged SQLite index met on the way ends the command with what to do."""

    run = command

    @functools.wraps(run)
    def naming_damage(**kwargs):
        try:
            with engine_failures():
                return run(**kwargs)
        except IndexFailed as exc:
            config = _config(kwargs["config_file"], kwargs["data_dir"], kwargs["index_url"])
            damage = config.index_location.corruption(exc)
            if damage is None:
                raise
            fail(str(damage), EXIT_NOT_FOUND)

    command = naming_damage
    command = click.option(
        "--index-url",
        help="the index, when not index.sqlite in the data dir: postgresql://user@host/db"
        " [default: index_url from --config]",
    )(command)
    command = click.option(
        "--data-dir",
        type=click.Path(path_type=Path, file_okay=False),
        help="data directory [default: data, or data_dir from --config]",
    )(command)
    return config_file_option("the service's TOML config file")(command)


def json_option(shape: str):
    """`--json`, the output for scripts every command has beside its table."""
    return click.option("--json", "as_json", is_flag=True, help=f"{shape}, camelCase keys")


def filter_options(command):
    options = [
        click.option("--patient-id", help="exact Patient ID"),
        click.option("--patient-name", help="Patient's Name, DICOM wildcards * and ?, any case"),
        click.option("--from", "date_from", help="study date on or after (2026-11-22)"),
        click.option("--to", "date_to", help="study date on or before"),
        click.option("--modality", help="a modality in the study (CT, MR, …)"),
        click.option("--accession", help="exact Accession Number"),
        click.option("--received-since", help="last received at or after: ISO time or age (2h)"),
        click.option("--limit", type=click.IntRange(min=1), help="at most this many studies"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _filters(kwargs: dict) -> StudyFilter:
    names = StudyFilter.__dataclass_fields__
    return StudyFilter(**{name: kwargs.pop(name) for name in list(kwargs) if name in names})


def _reader(config) -> CatalogReader:
    location = config.index_location
    try:
        return CatalogReader.open(location)  # one command, one connection: no pool
    except IndexUnreachable as exc:
        advice = (
            "check --index-url, and that PostgreSQL runs there and lets this user in"
            if location.shared_by_nodes
            else "has `imaging-scp serve` received anything into this data dir?"
        )
        fail(f"{exc} ({advice})", EXIT_NOT_FOUND)


def _open_index(config):
    from storage.catalog import Catalog  # the writer side: only the commands that change things

    _reader(config).close()  # the same "no index" error as the read commands
    return Catalog.open(config.index_location)


def _config(config_file, data_dir, index_url):
    return effective_config(config_file, {"data_dir": data_dir, "index_url": index_url})


# --- presentation -------------------------------------------------------------


def _received(value: str | None) -> str:
    """A time the index recorded (UTC) as tables show it: 2026-12-01 20:41:24Z."""
    return (value or "").replace("T", " ")[:19] + ("Z" if value else "")


def print_table(headers: list[str], rows: list[list], *, empty: str | None = None) -> None:
    """A table for people; with no rows, the one line `empty` instead, when given."""
    if not rows and empty:
        click.echo(empty)
        return
    cells = [[str(c) if c is not None else "" for c in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    # Cut lines to a terminal's width only: a pipe or a file gets whole paths.
    limit = shutil.get_terminal_size().columns if sys.stdout.isatty() else None

    def line(values):
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()[:limit]

    click.echo(line(headers))
    click.echo(line(["-" * w for w in widths]))
    for row in cells:
        click.echo(line(row))


def _dump(value) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


# --- commands ----------------------------------------------------------------


@click.command()
@filter_options
@json_option("a JSON array")
@click.option("--ndjson", is_flag=True, help="one JSON object per line")
@data_options
def studies(config_file, data_dir, index_url, as_json, ndjson, **kwargs):
    """List studies, most recently received first."""
    config = _config(config_file, data_dir, index_url)
    kwargs_given = any(value is not None for value in kwargs.values())
    filters = _filters(kwargs)
    try:
        with _reader(config) as reader:
            found = reader.studies(filters, config.stable_after)
            if ndjson:
                for study in found:
                    click.echo(json.dumps(study_json(study), ensure_ascii=False))
                return
            found = list(found)
    except FilterError as exc:
        fail(str(exc), EXIT_USAGE)
    if as_json:
        _dump([study_json(s) for s in found])
        return
    print_table(
        ["date", "patient id", "name", "accession", "modalities", "series", "instances",
         "availability", "state", "last received", "study uid"],
        [
            [date_text(s["study_date"]), s["patient_id"], s["patient_name"], s["accession"],
             ",".join(modalities_of(s)), s["number_of_series"], s["number_of_instances"],
             s["availability"], s["state"], _received(s["last_received"]), s["study_uid"]]
            for s in found
        ],
        empty="no studies" + (" match these filters" if kwargs_given else ""),
    )  # fmt: skip


@click.command()
@click.argument("study_uid")
@click.option("--instances", is_flag=True, help="also list instances with their paths")
@click.option("--mark-complete", is_flag=True, help="clear the study's 'incomplete' mark")
@json_option("one JSON object")
@data_options
def study(config_file, data_dir, index_url, study_uid, instances, mark_complete, as_json):
    """Show one study: its attributes and its series."""
    config = _config(config_file, data_dir, index_url)
    if mark_complete:
        from storage.catalog.series import mark_study_complete

        index = _open_index(config)
        cleared = mark_study_complete(index, study_uid)
        index.close()
        click.echo(f"marked complete: {cleared} series", err=True)
    with _reader(config) as reader:
        found = reader.study(study_uid, config.stable_after, with_instances=instances)
        if found is None:
            fail(f"no study {study_uid} in the index", EXIT_NOT_FOUND)
        conflicts = reader.count_conflicts(study_uid)
    if as_json:
        _dump({**study_json(found), "conflicts": conflicts})
        return
    attributes = [
        ("study uid", found["study_uid"]),
        ("patient", f"{found['patient_id'] or ''}  {found['patient_name'] or ''}".strip()),
        ("date", f"{date_text(found['study_date'])} {found['study_time'] or ''}".strip()),
        ("accession", found["accession"]),
        ("description", found["description"]),
        ("referrer", found["referrer"]),
        ("modalities", ",".join(modalities_of(found))),
        ("series", found["number_of_series"]),
        ("instances", found["number_of_instances"]),
        ("bytes", found["bytes"]),
        ("availability", found["availability"]),
        ("conflicts", f"{conflicts} (imaging-scp conflicts --study UID)" if conflicts else None),
        ("state", found["state"]),
        ("incomplete because", found["incomplete_reason"]),
        ("first received", _received(found["first_received"])),
        ("last received", _received(found["last_received"])),
    ]
    for name, value in attributes:
        if value not in (None, ""):
            click.echo(f"{name + ':':<20}{value}")
    click.echo()
    print_table(
        ["number", "modality", "description", "instances", "availability", "state",
         "committed", "first received", "last received", "series uid"],
        [
            [s["number"], s["modality"], s["description"], s["number_of_instances"],
             s["availability"], s["state"], _received(s["committed_at"]),
             _received(s["first_received"]), _received(s["last_received"]), s["series_uid"]]
            for s in found["series"]
        ],
    )  # fmt: skip
    for s in found["series"]:
        if s["incomplete_reason"]:
            click.echo(
                f"series {s['number'] or s['series_uid']} incomplete: {s['incomplete_reason']}"
            )
    if instances:
        click.echo()
        print_table(
            ["series", "number", "sop instance uid", "bytes", "received", "path"],
            [
                [s["number"], i["number"], i["sop_instance_uid"], i["size"],
                 _received(i["received_at"]), str(config.data_dir / i["path"])]
                for s in found["series"]
                for i in s["instances"]
            ],
        )  # fmt: skip


_VERSION_OPTION = click.option(
    "--version",
    "fhir_version",
    type=click.Choice(["r4", "r5", "dstu2", "dstu2-ballot"]),
    default="r4",
    show_default=True,
    help="r4, r5, dstu2 (FHIR 1.0.2, what DSTU2 clients parse) or dstu2-ballot (v0.5.0)",
)


@click.command()
@click.argument("study_uid")
@_VERSION_OPTION
@data_options
def fhir(config_file, data_dir, index_url, study_uid, fhir_version):
    """One study as a FHIR ImagingStudy (JSON), instances included."""
    from storage.fhir import imaging_study

    config = _config(config_file, data_dir, index_url)
    with _reader(config) as reader:
        resource = imaging_study(reader, study_uid, fhir_version, **_rendering(config))
    if resource is None:
        fail(f"no study {study_uid} in the index", EXIT_NOT_FOUND)
    _dump(resource)


def _rendering(config) -> dict:
    return {
        "stable_after": config.stable_after,
        "wado_base_url": config.wado_url,
        "site_timezone": config.site_timezone,
    }


@click.command()
@filter_options
@_VERSION_OPTION
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["bundle", "ndjson"]),
    default="bundle",
    show_default=True,
    help="a searchset Bundle, or one ImagingStudy per line",
)
@click.option("--instances", is_flag=True, help="include each series' instances")
@click.option("-o", "--output", type=click.File("w"), default="-", help="file [default: stdout]")
@data_options
def export(
    config_file, data_dir, index_url, fhir_version, output_format, instances, output, **kwargs
):
    """Many studies as FHIR ImagingStudy resources."""
    from storage.fhir import imaging_studies, render_bundle

    config = _config(config_file, data_dir, index_url)
    filters = _filters(kwargs)
    try:
        with _reader(config) as reader:
            resources = imaging_studies(
                reader, filters, fhir_version, with_instances=instances, **_rendering(config)
            )
            to_file = output is not sys.stdout and getattr(output, "name", "-") != "<stdout>"
            length = reader.count_studies(filters) if to_file else 0
            with _progress("exporting", length) as bar:
                if output_format == "ndjson":
                    for resource in resources:
                        output.write(
                            json.dumps(resource, ensure_ascii=False, separators=(",", ":"))
                        )
                        output.write("\n")
                        bar.update(1)
                else:
                    bundle = render_bundle(list(_counted(resources, bar)), fhir_version)
                    json.dump(bundle, output, ensure_ascii=False)
                    output.write("\n")
    except FilterError as exc:
        fail(str(exc), EXIT_USAGE)


def _counted(items, bar):
    for item in items:
        bar.update(1)
        yield item


@click.command(name="stats")
@json_option("one JSON object")
@data_options
def stats_command(config_file, data_dir, index_url, as_json):
    """Totals: patients, studies, series, instances, bytes, per modality."""
    config = _config(config_file, data_dir, index_url)
    with _reader(config) as reader:
        totals = reader.stats()
    if as_json:
        _dump(camel_keys(totals))
        return
    for name in ("patients", "studies", "series", "instances", "bytes", "conflicts"):
        click.echo(f"{name + ':':<16}{totals[name]:,}")
    if totals["refused"]:
        click.echo(f"{'':<16}{totals['refused']:,} of them refused (imaging-scp conflicts)")
    click.echo(
        f"{'series state:':<16}{totals['complete_series']:,} complete (committed),"
        f" {totals['incomplete_series']:,} incomplete"
    )
    if totals["commitments"]:
        counts = ", ".join(f"{n:,} {state}" for state, n in sorted(totals["commitments"].items()))
        click.echo(f"{'commitments:':<16}{counts}")
    click.echo(f"{'last received:':<16}{_received(totals['last_received'])}")
    click.echo()
    print_table(
        ["modality", "studies", "series", "instances", "bytes"],
        [[m["modality"] or "(none)", m["studies"], m["series"], m["instances"], m["bytes"]]
         for m in totals["modalities"]],
    )  # fmt: skip


@click.command()
@click.option("--study", "study_uid", help="only resends of this study's instances")
@json_option("a JSON array")
@data_options
def conflicts(config_file, data_dir, index_url, study_uid, as_json):
    """Instances that conflicted with what was stored, newest first: a resend
    with other bytes (the copy kept aside under conflicts/, or the one that
    replaced the indexed copy), or an instance refused because it named another
    patient than its study's (nothing of it kept; the reason names both)."""
    config = _config(config_file, data_dir, index_url)
    with _reader(config) as reader:
        found = list(reader.conflicts(study_uid=study_uid))
    if as_json:
        _dump([conflict_json(c) for c in found])
        return
    print_table(
        ["received", "action", "calling ae", "sop instance uid", "bytes", "path or reason"],
        [[_received(c["received_at"]), c["action"], c["calling_ae"], c["sop_instance_uid"],
          c["size"], str(config.data_dir / c["path"]) if c["path"] else c["reason"]]
         for c in found],
        empty="no conflicts" + (f" in study {study_uid}" if study_uid else ""),
    )  # fmt: skip


@click.command()
@click.option("--pending", is_flag=True, help="only those whose report is not yet delivered")
@click.option("--study", "study_uid", help="only those referencing instances of this study")
@json_option("a JSON array")
@data_options
def commitments(config_file, data_dir, index_url, pending, study_uid, as_json):
    """Storage commitment requests, newest first: what was committed, and whether
    the report reached the requester."""
    config = _config(config_file, data_dir, index_url)
    with _reader(config) as reader:
        found = list(reader.commitments(pending=pending, study_uid=study_uid))
    if as_json:
        _dump([commitment_json(c) for c in found])
        return
    print_table(
        ["received", "requester", "instances", "committed", "failed", "delivery", "attempts",
         "last error", "transaction uid"],
        [
            [_received(c["requested_at"]), c["requester_ae"], c["instances"], c["committed"],
             c["failed"], c["delivery_state"] + (f" ({c['delivered_by']})" if c["delivered_by"]
                                                  else ""),
             c["attempts"], c["last_error"], c["transaction_uid"]]
            for c in found
        ],
        empty="no commitment requests" + (" match" if pending or study_uid else ""),
    )  # fmt: skip


@click.group()
def availability():
    """Set the availability of a study's or a series' instances."""


@availability.command(name="set")
@click.option("--study", "study_uid", help="every series of this study")
@click.option("--series", "series_uid", help="one series")
@click.argument("value", type=click.Choice(["online", "nearline", "offline", "unavailable"]))
@data_options
def availability_set(config_file, data_dir, index_url, study_uid, series_uid, value):
    """Set series availability; the study's is derived: the worst of its series
    (ONLINE < NEARLINE < OFFLINE < UNAVAILABLE)."""
    from storage.catalog.series import set_availability

    if (study_uid is None) == (series_uid is None):
        fail("give exactly one of --study UID or --series UID", EXIT_USAGE)
    index = _open_index(_config(config_file, data_dir, index_url))
    changed = set_availability(index, value, study_uid=study_uid, series_uid=series_uid)
    index.close()
    if not changed:
        fail(f"no {'series' if series_uid else 'study'} {series_uid or study_uid}", EXIT_NOT_FOUND)
    click.echo(f"{value.upper()}: {changed} series")


def _progress(label: str, length: int):
    """A progress bar (count, rate, time left) on a terminal, nothing otherwise."""
    if length and sys.stderr.isatty():
        return click.progressbar(length=length, label=label, file=sys.stderr)
    return _Silent()


class _Silent:
    def __enter__(self):
        return self

    def __exit__(self, *_):
        return False

    def update(self, _):
        pass


@click.command()
@click.option("--checksum", is_flag=True, help="also compare each file's SHA-256")
@click.option("--repair", is_flag=True, help="index files the index does not know")
@json_option("one JSON object")
@data_options
def verify(config_file, data_dir, index_url, checksum, repair, as_json):
    """Check that every indexed file is on disk as recorded. Exit 1 if not."""
    from storage.catalog import count_instances
    from storage.maintenance import verify as run_verify

    config = _config(config_file, data_dir, index_url)
    try:  # before anything writes to it; and a damaged page no row leads to is damage too
        config.index_location.check_intact(quick=False)
    except IndexCorrupt as exc:
        fail(str(exc), EXIT_NOT_FOUND)
    index = _open_index(config)
    with _progress("verifying", count_instances(config.index_location)) as bar:
        report = run_verify(
            index, config.data_dir, checksum=checksum, repair=repair, progress=bar.update
        )
    index.close()
    if as_json:
        _dump(camel_keys({**report.__dict__, "ok": report.ok}))
    else:
        click.echo(
            f"checked {report.checked:,} indexed files"
            f" and {report.checked_kept_aside:,} kept-aside copies"
        )
        for name, items in [
            ("missing", report.missing),
            ("wrong size", report.wrong_size),
            ("wrong checksum", report.wrong_checksum),
            ("series now UNAVAILABLE", report.unavailable_series),
            ("series available again (their files are back)", report.available_again),
            ("files the index does not know", report.unknown_files),
            ("indexed (repair)", report.repaired),
            ("could not index", report.unindexable),
        ]:
            if items:
                click.echo(f"{name}: {len(items)}")
                for item in items[:20]:
                    click.echo(f"  {item}")
                if len(items) > 20:
                    click.echo(f"  … and {len(items) - 20} more")
        click.echo("OK" if report.ok else "PROBLEMS FOUND")
    sys.exit(0 if report.ok else 1)


@click.command()
@data_options
def rebuild(config_file, data_dir, index_url):
    """Recreate the index from the files on disk (safe to interrupt and rerun);
    a damaged or missing SQLite index too (the damaged file is kept aside)."""
    from storage.maintenance import RebuildRefused, rebuild_size
    from storage.maintenance import rebuild as run_rebuild

    config = _config(config_file, data_dir, index_url)
    location = config.index_location
    size = rebuild_size(config.data_dir)
    if location.shared_by_nodes or not size:  # nothing to rebuild from: a wrong --data-dir?
        _reader(config).close()
    try:
        with _progress("rebuilding", size) as bar:
            report = run_rebuild(location, progress=bar.update)
    except (RebuildRefused, IndexBusy) as exc:
        fail(str(exc), EXIT_NOT_FOUND)
    if report.kept_aside:
        click.echo(f"the damaged index is kept aside as {report.kept_aside}")
    click.echo(f"indexed {report.instances:,} instances, {report.conflicts:,} kept-aside copies")
    carried = ", ".join(f"{table} {count:,}" for table, count in report.carried_over.items())
    if carried:
        click.echo(f"carried over from the old index (rows): {carried}")
    for problem in report.not_carried_over:
        click.echo(f"not carried over: {problem}", err=True)
    for problem in report.unindexable:
        click.echo(f"could not index: {problem}", err=True)


@click.command()
@click.option("--study", "study_uid")
@click.option("--series", "series_uid")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@data_options
def delete(config_file, data_dir, index_url, study_uid, series_uid, yes):
    """Remove a study or a series: its files and its index rows."""
    from storage.changes import delete as delete_study_or_series

    if (study_uid is None) == (series_uid is None):
        fail("give exactly one of --study UID or --series UID", EXIT_USAGE)
    config = _config(config_file, data_dir, index_url)
    what = f"series {series_uid}" if series_uid else f"study {study_uid}"
    with _reader(config) as reader:
        count = reader.instance_count(study_uid=study_uid, series_uid=series_uid)
    if count is None:
        fail(f"no {what} in the index", EXIT_NOT_FOUND)
    if not yes:
        if not sys.stdin.isatty():
            fail(f"not deleting {what} without --yes (no terminal to ask on)", EXIT_USAGE)
        click.confirm(f"Delete {what} and its {count} instances?", abort=True)
    index = _open_index(config)
    with _progress("deleting", count) as bar:
        deletion = delete_study_or_series(
            index, config.data_dir, study_uid=study_uid, series_uid=series_uid, progress=bar.update
        )
    index.close()
    click.echo(f"deleted {what}: {deletion.instances} instances, {deletion.bytes:,} bytes")


@click.command("migrate-index")
@click.option("--to", "target_url", required=True, help="the new index: postgresql://user@host/db")
@data_options
def migrate_index(config_file, data_dir, index_url, target_url):
    """Copy the data dir's SQLite index into PostgreSQL (idempotent; counts checked)."""
    from storage.catalog import count_instances
    from storage.catalog.engines import check_index_url
    from storage.catalog.migrate import MigrationRefused
    from storage.catalog.migrate import migrate_index as run_migration

    config = _config(config_file, data_dir, index_url)
    problem = check_index_url(target_url)
    if problem:
        fail(f"--to: {problem}", EXIT_USAGE)
    source = IndexLocation(config.data_dir)
    _reader(dataclasses.replace(config, index_url="")).close()  # the same "no index" error
    try:
        with _progress("copying instances", count_instances(source)) as bar:
            copied = run_migration(config.data_dir, target_url, progress=bar.update)
    except (MigrationRefused, IndexUnreachable) as exc:
        fail(str(exc), EXIT_USAGE)
    target = IndexLocation(config.data_dir, target_url).describe()
    click.echo(f"copied {source.describe()} to {target}:")
    for table, count in copied.items():
        click.echo(f"  {table}: {count:,} rows (counts equal)")
    click.echo(f"now serve with index_url = {target!r}")


COMMANDS = [studies, study, fhir, export, stats_command, conflicts, commitments, availability,
            verify, rebuild, delete, migrate_index]  # fmt: skip
