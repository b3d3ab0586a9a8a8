"""Commands for running imaging-scp as a service: `echo` and `check-config`.

Both print one clear line on stderr when something is wrong, and exit with
0 (fine), 1 (the peer cannot be reached or said no) or 2 (bad usage or config).
"""

import dataclasses
import enum
import json
import tomllib
from pathlib import Path

import click

from scp.cli.options import fail, flag_of
from scp.config import Config, ConfigError, FreeSpace, is_ae_title, load_config
from storage.catalog.engines import redact

# --- echo -------------------------------------------------------------------


def _ae_title(_ctx, param, value: str) -> str:
    if not is_ae_title(value):
        raise click.BadParameter(
            f"an AE title is 1 to 16 printable ASCII characters, no backslash; got {value!r}",
            param=param,
        )
    return value


@click.command()
@click.option(
    "--aet",
    default="ECHOSCU",
    show_default=True,
    callback=_ae_title,
    help="Our (calling) AE title.",
)
@click.option(
    "--called-aet",
    default="IMAGING_SCP",
    show_default=True,
    callback=_ae_title,
    help="The peer's (called) AE title.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds to wait for the connection and for each answer.",
)
@click.argument("host")
@click.argument("port", type=click.IntRange(1, 65535))
def echo(aet: str, called_aet: str, timeout: float, host: str, port: int):
    """Send a DICOM C-ECHO to HOST PORT and print the round trip.

    Exit 0 when the peer answers Success, 1 when it cannot be reached, rejects
    the association or answers anything else, 2 on a usage error.
    """
    from scp.echo import EchoFailed
    from scp.echo import echo as send_echo

    try:
        times = send_echo(host, port, calling=aet, called=called_aet, timeout=timeout)
    except EchoFailed as exc:
        fail(str(exc), 1)
    click.echo(
        f"C-ECHO {called_aet}@{host}:{port}: Success (0x0000) in {times.echo_ms:.1f} ms"
        f" (association {times.association_ms:.1f} ms)"
    )


# --- check-config -----------------------------------------------------------


def _toml_value(value) -> str:
    """`value` as a TOML literal (the types Config uses)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):  # an inline table; keys quoted, AE titles may have spaces
        pairs = (f"{json.dumps(str(key))} = {_toml_value(item)}" for key, item in value.items())
        return "{ " + ", ".join(pairs) + " }" if value else "{}"
    if isinstance(value, enum.Enum):
        value = value.value
    return json.dumps(str(value), ensure_ascii=False)  # a TOML basic string


def _json_value(value):
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path | FreeSpace):
        return str(value)
    return value


@click.command("check-config")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the values as one JSON object.")
def check_config(file: Path, as_json: bool):
    """Validate a TOML config FILE and print every effective value.

    Exit 0 when the file is valid; 2 with one line naming the key when not.
    """
    try:
        config = load_config(file)
        with file.open("rb") as handle:
            from_file = set(tomllib.load(handle))
        from scp.server import allowed_callers

        allowed_callers(config)  # host names resolved, as `serve` will
        if config.tls_port:  # the certificate and key as `serve` will load them
            from scp.tls import server_context

            server_context(config)
    except ConfigError as exc:
        message = str(exc)
        fail(message if message.startswith(str(file)) else f"{file}: {message}", 2)
    except OSError as exc:
        fail(f"{file}: {exc.strerror or exc}", 2)

    items = [(item.name, getattr(config, item.name)) for item in dataclasses.fields(Config)]
    # What is printed may land in a ticket or a terminal log: no password.
    items = [(key, redact(value) if key == "index_url" else value) for key, value in items]
    if as_json:
        click.echo(json.dumps({key: _json_value(value) for key, value in items}, indent=2))
        return
    width = max(len(key) for key, _ in items)
    values = [_toml_value(value) for _, value in items]
    value_width = max(len(value) for value in values)
    for (key, _), value in zip(items, values, strict=True):
        source = "file" if key in from_file else "default"
        click.echo(f"{key:<{width}}  {value:<{value_width}}  ({source})")


# --- the example configuration ----------------------------------------------

# Remarks for running under systemd/imaging-scp.service, after a key's help.
_SERVICE_NOTES = {
    "host": "'::' listens on IPv6 and, on most systems, IPv4 too",
    "port": "104, the DICOM well-known port, works too: the unit grants CAP_NET_BIND_SERVICE",
    "data_dir": "the unit's StateDirectory=imaging-scp, the one place the service may write",
    "drain_timeout": "keep it below the unit's TimeoutStopSec=",
    "log_level": "logs go to the journal as JSON lines: journalctl -u imaging-scp -o cat | jq",
    "allowed_callers": 'e.g. { CT_1 = ["10.20.1.15"], PACS = ["10.20.0.0/16"], ANYWHERE = [] }',
    "index_timeout": "keep it below the senders' DIMSE timeout (often 30 to 60 s)",
    "peers": 'e.g. { CT_1 = "10.20.1.15:104", ORTHANC = "10.20.0.5:4242" }',
    "web_host": "read by systemd/imaging-scp-web.service (imaging-scp web), not by `serve`",
    "web_tokens": "e.g. /etc/imaging-scp/web-tokens; re-read on `systemctl reload imaging-scp-web`",
}


def default_value(item: dataclasses.Field):
    """A Config field's default, whether a value or a factory."""
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return item.default


def example_config(data_dir: str = "/var/lib/imaging-scp") -> str:
    """The text of systemd/config.toml: every key of Config with its default, a
    one-line explanation, and `data_dir` pointing at the service's state directory.
    tests/test_systemd.py checks the file against this."""
    lines = [
        "# imaging-scp configuration: /etc/imaging-scp/config.toml for the systemd unit.",
        "# Every key is listed with its default value (data_dir excepted) and what it does.",
        "# Check a change before restarting: imaging-scp check-config /etc/imaging-scp/config.toml",
    ]
    for item in dataclasses.fields(Config):
        default = default_value(item)
        comment = f"# {item.metadata['help']} (default: {_toml_value(default)})"
        if item.name in _SERVICE_NOTES:
            comment += f"; {_SERVICE_NOTES[item.name]}"
        value = data_dir if item.name == "data_dir" else default
        lines += ["", comment, f"{item.name} = {_toml_value(value)}"]
    return "\n".join(lines) + "\n"


# --- the configuration reference --------------------------------------------

# Where the docs say more about a key than its one line of help.
_SUBJECTS = {
    "data_dir": "receiving.md",
    "max_pdu": "receiving.md",
    "duplicates": "receiving.md",
    "network_timeout": "receiving.md",
    "drain_timeout": "receiving.md",
    "log_level": "logs.md",
    "stable_after": "the-index.md",
    "wado_base_url": "admin.md",
    "site_timezone": "admin.md",
    "allowed_callers": "receiving.md",
    "min_free_space": "receiving.md",
    "tls_port": "tls.md",
    "tls_certificate": "tls.md",
    "tls_private_key": "tls.md",
    "tls_client_ca": "tls.md",
    "tls_handshake_timeout": "tls.md",
    "workers": "performance.md",
    "peers": "commitment.md",
    "report_retry_interval": "commitment.md",
    "report_attempts": "commitment.md",
    "find_limit": "find.md",
    "index_url": "nodes.md",
    "index_timeout": "nodes.md",
    "node_name": "nodes.md",
}

CONFIG_REFERENCE_COMMAND = (
    ".venv/bin/python -c 'from scp.cli.service import config_reference;"
    ' print(config_reference(), end="")\' > docs/configuration.md'
)


def config_reference() -> str:
    """The text of docs/configuration.md: every key of Config with its flag, its
    default and its help, as `serve --help` has them. tests/test_docs.py checks
    the file against this."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from scp/config.py (the Config dataclass, as the flags are): do not",
        f"     edit. After changing a key: {CONFIG_REFERENCE_COMMAND} -->",
        "",
        "`imaging-scp serve --config FILE` reads a TOML file; every key is also a flag",
        "(`data_dir` ↔ `--data-dir`). A flag wins over the file, the file over the defaults.",
        "`imaging-scp serve --help` lists them all with their defaults.",
        "",
        "A bad key or value stops the command with one line naming the key and exit code 2.",
        "`imaging-scp check-config FILE` checks a file and prints every effective value",
        "(`--json` too); `systemd/config.toml` is an example with every key, its default and",
        "what it does.",
        "",
        "| key | flag | default | meaning | more |",
        "|---|---|---|---|---|",
    ]
    for item in dataclasses.fields(Config):
        flag = flag_of(item)
        if item.type is bool:
            flag = f"`{flag}` / `--no-{flag[2:]}`"
        elif item.type is dict:
            flag = f"`{flag}` (repeatable)"
        else:
            flag = f"`{flag}`"
        subject = _SUBJECTS.get(item.name)
        more = f"[{subject}]({subject})" if subject else ""
        default = _toml_value(default_value(item))
        meaning = item.metadata["help"].replace("<", "&lt;").replace(">", "&gt;")  # not HTML
        lines.append(f"| `{item.name}` | {flag} | `{default}` | {meaning} | {more} |")
    return "\n".join(lines) + "\n"
