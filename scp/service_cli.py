"""Commands for running imaging-scp as a service: `echo` and `check-config`.

Both print one clear line on stderr when something is wrong, and exit with
0 (fine), 1 (the peer cannot be reached or said no) or 2 (bad usage or config).
"""

import dataclasses
import enum
import json
import logging
import os
import sys
import time
import tomllib
from pathlib import Path

import click

from scp.cli_options import fail
from scp.config import Config, ConfigError, FreeSpace, is_ae_title, load_config
from scp.logs import error_line

# --- echo -------------------------------------------------------------------


class _Collected(logging.Handler):
    """Keeps pynetdicom's log messages: they are the only place it says *why*
    an association failed (refused, rejected and for which reason, timed out)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def find(self, prefix: str) -> str | None:
        for message in self.messages:
            if message.startswith(prefix):
                return message[len(prefix) :].strip()
        return None


def _ae_title(_ctx, param, value: str) -> str:
    if not is_ae_title(value):
        raise click.BadParameter(
            f"an AE title is 1 to 16 printable ASCII characters, no backslash; got {value!r}",
            param=param,
        )
    return value


def _no_echo(message: str):
    """Give up on the peer: exit 1 now. pynetdicom's reader thread may be stuck
    in recv() on a peer that is not DICOM (the length field of an HTTP answer
    says a gigabyte follows), and it must not keep the command alive."""
    click.echo(error_line(message), err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


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
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    collected = _Collected()
    pynetdicom_log = logging.getLogger("pynetdicom")
    pynetdicom_log.addHandler(collected)
    pynetdicom_log.setLevel(logging.INFO)
    pynetdicom_log.propagate = False

    ae = AE(ae_title=aet)
    ae.add_requested_context(Verification)
    ae.connection_timeout = ae.acse_timeout = timeout
    ae.dimse_timeout = ae.network_timeout = timeout
    peer = f"{called_aet}@{host}:{port}"

    started = time.perf_counter()
    try:
        assoc = ae.associate(host, port, ae_title=called_aet)
    except OSError as exc:  # socket.gaierror: the host name does not resolve
        _no_echo(f"cannot resolve {host}: {exc.strerror or exc}")
    associated = time.perf_counter()
    if not assoc.is_established:
        if assoc.is_rejected:
            result = collected.find("Result:") or "rejected"
            reason = collected.find("Reason:")
            _no_echo(f"{peer} rejected the association: {result}; {reason}")
        cause = collected.find("TCP Initialisation Error:")
        if cause:  # (pynetdicom also marks this one "aborted")
            _no_echo(f"cannot connect to {host}:{port}: {cause}")
        if assoc.is_aborted:
            unknown = collected.find("Unknown PDU type received")
            if unknown:
                _no_echo(f"{host}:{port} answered something that is not DICOM (PDU type {unknown})")
            _no_echo(f"{peer} aborted the association")
        _no_echo(f"no association with {peer} (no answer within {timeout:g} s)")
    try:
        response = assoc.send_c_echo()
    except ValueError:  # no accepted presentation context for Verification
        assoc.release()
        _no_echo(f"{peer} does not accept the Verification SOP Class (C-ECHO)")
    answered = time.perf_counter()
    assoc.release()

    code = response.get("Status")
    if code is None:
        _no_echo(f"{peer} did not answer the C-ECHO within {timeout:g} s")
    if code != 0x0000:
        _no_echo(f"{peer} answered the C-ECHO with status 0x{code:04X}")
    click.echo(
        f"C-ECHO {peer}: Success (0x0000) in {(answered - associated) * 1000:.1f} ms"
        f" (association {(associated - started) * 1000:.1f} ms)"
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
    "peers": 'e.g. { CT_1 = "10.20.1.15:104", ORTHANC = "10.20.0.5:4242" }',
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
