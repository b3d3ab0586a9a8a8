"""`imaging-scp conformance`: the DICOM Conformance Statement (scp.conformance)."""

from pathlib import Path

import click


@click.command()
@click.option(
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write it to FILE (docs/conformance-statement.md in the repository) instead of stdout.",
)
def conformance(output: Path | None):
    """Print the DICOM Conformance Statement (Markdown), generated from the code."""
    from scp.conformance import statement

    text = statement()
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
