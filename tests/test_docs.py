"""The README and docs/ against the code: the configuration reference is the one
generated from Config, every `imaging-scp` example still parses, every link to
a file leads to one."""

import dataclasses
import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from scp.cli import main
from scp.cli.service import CONFIG_REFERENCE_COMMAND, config_reference
from scp.config import Config

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Where a line ends as a command: a pipe, a redirection, a next command.
_COMMAND_ENDS = {"|", "||", "&&", ";", ">", ">>", "<", "&"}


def test_the_configuration_reference_is_generated_from_config():
    reference = (ROOT / "docs" / "configuration.md").read_text()
    regenerate = f"regenerate it:\n  {CONFIG_REFERENCE_COMMAND}"
    keys = re.findall(r"^\| `(\w+)` \|", reference, re.MULTILINE)
    missing = [item.name for item in dataclasses.fields(Config) if item.name not in keys]
    assert not missing, f"docs/configuration.md lacks {missing}; {regenerate}"
    assert reference == config_reference(), (
        f"docs/configuration.md is not what Config generates; {regenerate}"
    )


def command_examples(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, arguments after `imaging-scp`) of each command line in the
    file's sh blocks that runs imaging-scp (`.venv/bin/imaging-scp`, under `sudo`)."""
    examples, in_sh, pending, start = [], False, "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            in_sh = not in_sh and line.strip() == "```sh"
            continue
        if not in_sh:
            continue
        if not pending:
            start = number
        if line.endswith("\\"):  # continued on the next line
            pending += line[:-1] + " "
            continue
        lexer = shlex.shlex(pending + line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        pending, words = "", list(lexer)
        if words[:1] == ["sudo"]:
            words = words[1:]
        if words and Path(words[0]).name == "imaging-scp":
            arguments = []
            for word in words[1:]:
                if word in _COMMAND_ENDS:
                    break
                arguments.append(word)
            examples.append((start, arguments))
    return examples


EXAMPLES = [
    pytest.param(arguments, id=f"{path.relative_to(ROOT)}:{number}")
    for path in DOCS
    for number, arguments in command_examples(path)
]


def test_the_docs_have_command_examples():
    assert len(EXAMPLES) > 30  # the parser finds them


@pytest.mark.parametrize("arguments", EXAMPLES)
def test_every_command_example_parses(arguments):
    """The example's subcommand has a --help, and its options and arguments are
    what that subcommand takes (parsed as the command would, without running it)."""
    command, rest, names = main, list(arguments), []
    try:
        while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
            name, command, rest = command.resolve_command(click.Context(command), rest)
            names.append(name)
        helped = CliRunner().invoke(main, [*names, "--help"])
        assert helped.exit_code == 0, helped.output
        if "--help" not in rest:
            command.make_context(shlex.join(["imaging-scp", *names]), rest).close()
    except click.ClickException as exc:
        pytest.fail(f"imaging-scp {shlex.join(arguments)}: {exc.format_message()}")


def test_every_link_to_a_file_leads_to_one():
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" not in target:
                assert (path.parent / target).exists(), f"{path.relative_to(ROOT)}: {target}"


def test_the_readme_links_every_doc_and_fits_on_a_few_screens():
    readme = (ROOT / "README.md").read_text()
    for doc in (ROOT / "docs").glob("*.md"):
        assert f"(docs/{doc.name})" in readme, f"README.md does not link docs/{doc.name}"
    assert len(readme.splitlines()) <= 250
