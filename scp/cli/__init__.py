"""The `imaging-scp` command: `serve`, `web`, `echo`, `check-config`, `conformance`, `send`
(scp.cli.send), and the admin commands over the index (scp.cli.admin)."""

import sys

import click

from scp.cli import admin
from scp.cli.conformance import conformance
from scp.cli.options import EXIT_NOT_FOUND, config_options, effective_config, fail
from scp.cli.send import send
from scp.cli.service import check_config, echo
from scp.cli.web import web
from scp.config import load_config
from storage.catalog.engines import IndexFailed, SchemaTooNew, engine_failures
from storage.codec.datasets import lenient_reading


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """imaging-scp: a DICOM C-STORE receiver with an ImagingStudy index."""
    lenient_reading.everywhere()


def run() -> None:
    """The console entry point: click's own usage errors become one line too."""
    try:
        with engine_failures():
            code = main.main(standalone_mode=False)
    except click.exceptions.Abort:
        fail("aborted", EXIT_NOT_FOUND)
    except click.ClickException as exc:
        fail(exc.format_message(), exc.exit_code)
    except SchemaTooNew as exc:
        fail(str(exc), EXIT_NOT_FOUND)
    except OSError as exc:
        fail(f"{type(exc).__name__}: {exc}", EXIT_NOT_FOUND)
    except IndexFailed as exc:  # e.g. the index's disk is full
        fail(f"{exc.kind}: {exc}", EXIT_NOT_FOUND)
    sys.exit(code or 0)


@main.command()
@config_options
def serve(config_file, **flags):
    """Listen for DICOM associations and store what arrives."""
    from scp.logs import configure_logging
    from scp.server import serve as run

    config = effective_config(config_file, flags)
    configure_logging(config.log_level)
    sys.exit(run(config, reload_config=lambda: load_config(config_file, **flags)))


for command in (echo, check_config, web, conformance, send, *admin.COMMANDS):
    main.add_command(command)
