"""`imaging-scp web`: FHIR REST and DICOMweb over the index (scp.web)."""

import sys

import click

from scp.cli.options import EXIT_USAGE, config_options, effective_config, fail


@click.command()
@config_options
def web(config_file, **flags):
    """Serve the index over HTTP: FHIR ImagingStudy (/fhir/r4, /fhir/r5), DICOMweb (/dicomweb)."""
    from scp.logs import configure_logging
    from scp.web.access import TokenFileError
    from scp.web.server import serve

    config = effective_config(config_file, flags)
    configure_logging(config.log_level)
    try:
        sys.exit(serve(config))
    except TokenFileError as exc:
        fail(str(exc), EXIT_USAGE)
