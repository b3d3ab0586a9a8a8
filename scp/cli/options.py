"""What every `imaging-scp` command shares: the config flags, how a command
fails (one line, an exit code), and the effective configuration."""

import dataclasses
import sys
from pathlib import Path

import click

from scp.config import Config, ConfigError, FreeSpace, load_config
from scp.logs import error_line
from storage.policy import DuplicatePolicy

_CLICK_TYPES = {
    int: click.INT,
    float: click.FLOAT,
    str: click.STRING,
    Path: click.Path(path_type=Path, file_okay=False),
    DuplicatePolicy: click.Choice([p.value for p in DuplicatePolicy]),
    FreeSpace: click.STRING,  # parsed by load_config, which names the key when it cannot
}


def config_options(command):
    """Add `--config FILE` and one flag per configuration key to a command."""
    for item in reversed(dataclasses.fields(Config)):
        flag = flag_of(item)
        if item.type is dict:  # allowed_callers, peers: repeatable
            option = click.option(flag, item.name, multiple=True, default=None, help=_help(item))
        elif item.type is bool:
            option = click.option(
                f"{flag}/--no-{flag[2:]}",
                item.name,
                default=None,
                help=_help(item),
            )
        else:
            option = click.option(
                flag,
                item.name,
                type=_CLICK_TYPES[item.type],
                default=None,
                help=_help(item),
            )
        command = option(command)
    return config_file_option("TOML file with any of the keys below; flags win over it.")(command)


def flag_of(item: dataclasses.Field) -> str:
    """The command-line flag of a Config field (`data_dir` -> `--data-dir`)."""
    return item.metadata.get("flag") or "--" + item.name.replace("_", "-")


def config_file_option(help: str):
    """`--config FILE`, passed to the command as `config_file`."""
    return click.option(
        "--config", "config_file", type=click.Path(path_type=Path, dir_okay=False), help=help
    )


def _help(item: dataclasses.Field) -> str:
    default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
    return f"{item.metadata['help']} [default: {default}]"


EXIT_NOT_FOUND = 1
EXIT_USAGE = 2


def fail(message: str, code: int) -> None:
    """End the command with one clear line on stderr."""
    click.echo(error_line(message), err=True)
    sys.exit(code)


def effective_config(config_file: Path | None, flags: dict) -> Config:
    try:
        return load_config(config_file, **flags)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
