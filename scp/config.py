"""Service configuration: defaults, a TOML file, and command-line flags.

Precedence: a flag given on the command line wins over the file, the file over
the defaults. Every key of the file is also a flag (``data_dir`` ↔ ``--data-dir``).
"""

import dataclasses
import difflib
import ipaddress
import re
import socket
import tomllib
import zoneinfo
from dataclasses import dataclass, field
from pathlib import Path

from scp.access import check_callers, parse_caller_flag
from storage.catalog.engines import IndexLocation, check_index_url
from storage.files import NODE_NAME
from storage.policy import DuplicatePolicy

WEB_HOST, WEB_PORT = "127.0.0.1", 8080


class ConfigError(ValueError):
    """A configuration problem, phrased for the admin: it names the key."""

    @property
    def key(self) -> str | None:
        """The key the message names (every message says "key 'name'")."""
        match = re.search(r"key '([^']+)'", str(self))
        return match.group(1) if match else None


def _key(default, help: str):
    return field(default=default, metadata={"help": help})


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


@dataclass(frozen=True)
class FreeSpace:
    """`min_free_space`, parsed once: a floor in bytes or (one of them is 0) in
    percent of the filesystem, with the text it was written as."""

    text: str
    bytes: int
    percent: float

    @classmethod
    def parse(cls, value) -> "FreeSpace":
        """From `1GiB`, `500MB`, `1073741824` or `5%`; ValueError otherwise."""
        text = str(value).strip().replace(" ", "")
        if text.endswith("%"):
            percent = float(text[:-1])
            if not 0 <= percent < 100:
                raise ValueError(value)
            return cls(text, 0, percent)
        try:
            return cls(text, byte_size(text), 0.0)
        except KeyError as exc:  # an unknown unit
            raise ValueError(value) from exc

    def __str__(self) -> str:
        return self.text


def byte_size(value: str) -> int:
    """`64MiB`, `500MB`, `1073741824` as a number of bytes."""
    text = value.strip().upper().replace(" ", "")
    number = text.rstrip("KMGTIB")
    return int(float(number) * _UNITS[text[len(number) :]])


@dataclass(frozen=True)
class Config:
    """Every setting of the service; each field is a TOML key and a flag."""

    aet: str = _key("IMAGING_SCP", "AE title this receiver answers to")
    host: str = _key("0.0.0.0", "address to listen on")
    port: int = _key(11112, "TCP port for plain DICOM (0: none, TLS only; needs tls_port)")
    data_dir: Path = _key(Path("data"), "where files and index.sqlite are kept")
    # Bounded: an unlimited max PDU lets one sender push a whole object in one PDU.
    max_pdu: int = _key(262144, "largest PDU we accept, in bytes")
    max_associations: int = _key(32, "simultaneous associations; more are rejected (transient)")
    duplicates: DuplicatePolicy = _key(
        DuplicatePolicy.KEEP_FIRST,
        "a resent SOP Instance UID with different bytes: keep-first, overwrite or reject",
    )
    require_called_aet: bool = _key(True, "refuse associations addressed to another AE title")
    network_timeout: float = _key(
        60.0, "seconds a connection may stay silent (idle, or stalled mid-PDU) before it is closed"
    )
    drain_timeout: float = _key(30.0, "seconds SIGTERM waits for associations in flight")
    log_level: str = _key("info", "debug, info, warning or error")
    stable_after: float = _key(
        60.0, "seconds without a new instance before a series or study is 'stable'"
    )
    wado_base_url: str = _key("", "WADO-RS base URL for ImagingStudy url/endpoint (none if empty)")
    site_timezone: str = _key(
        "", "IANA zone for study times without a UTC offset, e.g. Europe/Paris"
    )
    allowed_callers: dict = field(
        default_factory=dict,
        metadata={
            "help": "calling AE titles allowed in, each with the hosts/CIDRs it may call from"
            " (TOML table AE = [hosts]; flag AE@host,host; empty: everyone)"
        },
    )
    min_free_space: FreeSpace = _key(
        FreeSpace.parse("1GiB"),
        "below this free space (bytes, KiB/MiB/GiB/TiB, or %), refuse new objects",
    )
    tls_port: int = _key(
        0, "TCP port for DICOM over TLS, beside `port` (0: no TLS listener; 2762 is DICOM's)"
    )
    tls_certificate: str = _key(
        "", "PEM file with the server's certificate (and intermediates) for tls_port"
    )
    tls_private_key: str = _key("", "PEM file with the certificate's private key, unencrypted")
    tls_client_ca: str = _key(
        "", "PEM file of CAs; when set, TLS senders must present a certificate signed by one"
    )
    tls_handshake_timeout: float = _key(
        10.0, "seconds a new TLS connection has to complete its handshake"
    )
    workers: int = _key(
        1, "listener processes sharing the port(s) (SO_REUSEPORT): more use more cores"
    )
    peers: dict = field(
        default_factory=dict,
        metadata={
            "help": "where storage commitment reports go when the requester has released,"
            " and C-MOVE destinations: AE title = HOST:PORT (TOML table; flag --peer"
            " AE=HOST:PORT, repeatable)",
            "flag": "--peer",
        },
    )
    report_retry_interval: float = _key(
        10.0,
        "seconds before retrying an undelivered commitment report; doubles each time, up to"
        " 15 minutes",
    )
    report_attempts: int = _key(
        50, "attempts to deliver a commitment report before giving up (about 11 h by default)"
    )
    find_limit: int = _key(
        0, "most matches one C-FIND returns; beyond, it ends with 0xA700 (0: no limit)"
    )
    index_url: str = _key(
        "",
        "the index: empty for index.sqlite in data_dir, or postgresql://user@host/db (one"
        " index for several nodes sharing data_dir)",
    )
    index_timeout: float = _key(
        10.0,
        "seconds a C-STORE waits for the index (PostgreSQL, SQLite's write lock) before it is"
        " refused 0xA700",
    )
    node_name: str = _key(
        "",
        "this node's name: its temp files are in data_dir/.incoming/<node_name> (empty: host name)",
    )
    web_host: str = _key(WEB_HOST, "address `imaging-scp web` (FHIR REST, DICOMweb) listens on")
    web_port: int = _key(WEB_PORT, "TCP port of `imaging-scp web`")
    web_base_url: str = _key(
        "",
        "the web service's URL as clients reach it, written into ImagingStudy endpoint/url"
        " (empty: from web_host and web_port)",
    )
    web_tls_certificate: str = _key(
        "", "PEM file with the web service's certificate (and intermediates): HTTPS"
    )
    web_tls_private_key: str = _key("", "PEM file with that certificate's private key")
    web_tokens: str = _key(
        "",
        "file of the web's bearer tokens, one SHA-256 hex digest and a name per line (SIGHUP"
        " re-reads it); empty: no token, allowed only with a loopback web_host",
    )

    metrics_port: int = _key(
        0, "TCP port of the Prometheus metrics endpoint, /metrics over HTTP (0: none)"
    )
    metrics_host: str = _key(
        "127.0.0.1", "address of the metrics endpoint (0.0.0.0: every interface)"
    )

    @property
    def index_location(self) -> IndexLocation:
        return IndexLocation(self.data_dir, self.index_url)

    @property
    def node(self) -> str:
        return self.node_name or socket.gethostname()

    @property
    def web_url(self) -> str:
        """Where clients reach `imaging-scp web`: web_base_url, else its address."""
        if self.web_base_url:
            return self.web_base_url.rstrip("/")
        scheme = "https" if self.web_tls_certificate else "http"
        host = socket.getfqdn() if self.web_host in ("0.0.0.0", "::", "") else self.web_host
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{self.web_port}"

    @property
    def wado_url(self) -> str:
        """The WADO-RS base rendered ImagingStudy resources point at: wado_base_url,
        else this web service's DICOMweb root once a web key is set, else none."""
        if self.wado_base_url:
            return self.wado_base_url
        web_keys = [item for item in dataclasses.fields(self) if item.name.startswith("web_")]
        if all(getattr(self, item.name) == item.default for item in web_keys):
            return ""
        return self.web_url + "/dicomweb"


_LOG_LEVELS = ("debug", "info", "warning", "error")
# Keys of earlier versions that no longer mean anything, accepted in a file so
# that an existing configuration keeps working: every object is now received
# straight to a file, whatever its size.
_RETIRED_KEYS = frozenset({"large_object_threshold"})


def load_config(path: Path | None = None, **flags) -> Config:
    """Build the effective configuration. `flags` are command-line values; None
    means "not given"."""
    from_file = _read_file(Path(path)) if path is not None else {}
    # None (or an empty tuple, for a repeatable flag) means the flag was not given.
    given = {key: value for key, value in flags.items() if value not in (None, ())}
    try:
        return _validated({**from_file, **given})
    except ConfigError as exc:
        if exc.key in from_file and exc.key not in given:  # the file's: say which file
            raise ConfigError(f"{path}: {exc}") from None
        raise


def _read_file(path: Path) -> dict:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def _validated(values: dict) -> Config:
    fields = {item.name: item for item in dataclasses.fields(Config)}
    converted = {}
    for key, value in values.items():
        if key in _RETIRED_KEYS:
            continue
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{key}'{hint}")
        converted[key] = _convert(key, value, fields[key].type)
    config = Config(**converted)
    _check_ranges(config)
    return config


def _convert(key: str, value, kind):
    try:
        if kind is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, int | str):
                raise TypeError
            return int(value)
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise TypeError
            return float(value)
        if kind is Path:
            if not isinstance(value, str | Path):
                raise TypeError
            return Path(value)
        if kind is DuplicatePolicy:
            return DuplicatePolicy(value)
        if kind is FreeSpace:
            if isinstance(value, bool) or not isinstance(value, int | str):
                raise TypeError
            return FreeSpace.parse(value)
        if kind is dict:
            return _peers(value) if key == "peers" else _callers(value)
        if not isinstance(value, str):
            raise TypeError
        return value
    except (TypeError, ValueError) as exc:
        expected = {
            bool: "true or false",
            int: "an integer",
            float: "a number",
            Path: "a path",
            DuplicatePolicy: "one of " + ", ".join(p.value for p in DuplicatePolicy),
            FreeSpace: "bytes, e.g. 1GiB or 500MB, or a percent, e.g. 5%",
            dict: 'a table of AE title = "HOST:PORT"'
            if key == "peers"
            else "a table of AE title = [hosts]",
            str: "a string",
        }[kind]
        raise ConfigError(f"key '{key}': expected {expected}, got {value!r}") from exc


def _callers(value) -> dict[str, list[str]]:
    """The allowed callers from a TOML table or from repeated flags."""
    if isinstance(value, list | tuple):
        return dict(parse_caller_flag(item) for item in value)
    if not isinstance(value, dict):
        raise TypeError
    callers = {}
    for title, hosts in value.items():
        if isinstance(hosts, str):
            hosts = [hosts]
        if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
            raise TypeError
        callers[title] = hosts
    return callers


def _peers(value) -> dict[str, str]:
    """AE title -> "HOST:PORT", from a TOML table or from repeated AE=HOST:PORT flags."""
    if isinstance(value, list | tuple):
        pairs = []
        for item in value:
            title, sep, address = str(item).partition("=")
            if not sep:
                raise ValueError(f"expected AE=HOST:PORT, got {item!r}")
            pairs.append((title, address))
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        raise TypeError
    peers = {}
    for title, address in pairs:
        if not isinstance(address, str) or not is_ae_title(title):
            raise ValueError(f"{title!r} = {address!r}")
        host, sep, port = address.strip().rpartition(":")
        if not sep or not host or not port.isdecimal() or not 0 < int(port) <= 65535:
            raise ValueError(f"{title}: expected HOST:PORT, got {address!r}")
        peers[title.strip()] = f"{host}:{int(port)}"
    return peers


def peer_address(config: Config, ae_title: str | None) -> tuple[str, int] | None:
    """Where the AE `ae_title` listens, from `peers` (validated by load_config)."""
    address = config.peers.get(ae_title or "")
    if address is None:
        return None
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def is_ae_title(value: str) -> bool:
    """1 to 16 printable ASCII characters, not all spaces, no backslash (PS3.5 AE)."""
    return (
        0 < len(value.strip()) <= 16
        and value.isascii()
        and value.isprintable()
        and "\\" not in value
    )


def _check_ranges(config: Config) -> None:
    aet = config.aet
    if not is_ae_title(aet):
        raise ConfigError(f"key 'aet': an AE title is 1 to 16 ASCII characters, got {aet!r}")
    if not 0 <= config.port <= 65535:
        raise ConfigError(f"key 'port': must be 0..65535, got {config.port}")
    _check_tls(config)
    if not 0 <= config.metrics_port <= 65535:
        raise ConfigError(f"key 'metrics_port': must be 0..65535, got {config.metrics_port}")
    if config.metrics_port and config.metrics_port in (config.port, config.tls_port):
        raise ConfigError(f"key 'metrics_port': {config.metrics_port} is already a DICOM port")
    if not 1 <= config.workers <= 64:
        raise ConfigError(f"key 'workers': must be 1..64, got {config.workers}")
    if not 4096 <= config.max_pdu <= 16 * 1024 * 1024:
        raise ConfigError(f"key 'max_pdu': must be 4096..16777216 bytes, got {config.max_pdu}")
    if config.max_associations < 1:
        raise ConfigError(
            f"key 'max_associations': must be at least 1, got {config.max_associations}"
        )
    if config.find_limit < 0:
        raise ConfigError(f"key 'find_limit': must be 0 or more, got {config.find_limit}")
    if config.report_attempts < 1:
        raise ConfigError(
            f"key 'report_attempts': must be at least 1, got {config.report_attempts}"
        )
    for key in (
        "network_timeout",
        "drain_timeout",
        "stable_after",
        "tls_handshake_timeout",
        "report_retry_interval",
        "index_timeout",
    ):
        if getattr(config, key) <= 0:
            raise ConfigError(f"key '{key}': must be a positive number of seconds")
    if config.site_timezone:
        try:
            zoneinfo.ZoneInfo(config.site_timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise ConfigError(
                f"key 'site_timezone': unknown time zone {config.site_timezone!r}"
            ) from exc
    try:
        check_callers(config.allowed_callers)
    except ValueError as exc:
        raise ConfigError(f"key 'allowed_callers': {exc}") from exc
    problem = check_index_url(config.index_url)
    if problem:
        raise ConfigError(f"key 'index_url': {problem}")
    if not NODE_NAME.fullmatch(config.node):
        raise ConfigError(
            f"key 'node_name': {config.node!r} cannot name a directory: use letters, digits,"
            " '.', '_' or '-' (up to 64)"
        )
    _check_web(config)
    if config.log_level not in _LOG_LEVELS:
        raise ConfigError(
            f"key 'log_level': one of {', '.join(_LOG_LEVELS)}, got {config.log_level!r}"
        )


def _check_tls(config: Config) -> None:
    """The TLS keys go together. The files themselves are read by `serve`
    (scp.tls.server_context): the admin commands read this config too, as users
    who may not read the service's private key."""
    if not 0 <= config.tls_port <= 65535:
        raise ConfigError(f"key 'tls_port': must be 0..65535, got {config.tls_port}")
    if config.port == 0 and config.tls_port == 0:
        raise ConfigError("key 'port': 0 (no plain DICOM listener) needs tls_port (TLS only)")
    if config.tls_port and config.tls_port == config.port:
        raise ConfigError(f"key 'tls_port': {config.tls_port} is already `port`, the plain one")
    files = ("tls_certificate", "tls_private_key", "tls_client_ca")
    if config.tls_port:
        for key in files[:2]:
            if not getattr(config, key):
                raise ConfigError(f"key '{key}': required with tls_port")
    else:
        for key in files:
            if getattr(config, key):
                raise ConfigError(f"key 'tls_port': {key} is set but tls_port is 0 (no TLS)")


def _check_web(config: Config) -> None:
    if not 1 <= config.web_port <= 65535:
        raise ConfigError(f"key 'web_port': must be 1..65535, got {config.web_port}")
    if bool(config.web_tls_certificate) != bool(config.web_tls_private_key):
        raise ConfigError(
            "key 'web_tls_certificate': web_tls_certificate and web_tls_private_key go together"
        )
    if config.web_base_url and not re.match(r"https?://[^/]", config.web_base_url):
        raise ConfigError(
            f"key 'web_base_url': expected an http:// or https:// URL, got {config.web_base_url!r}"
        )
    if not config.web_tokens and not is_loopback(config.web_host):
        raise ConfigError(
            f"key 'web_tokens': required when web_host ({config.web_host}) is not a loopback"
            " address: without tokens, the index would be open to the network"
        )


def is_loopback(host: str) -> bool:
    """`localhost` or a loopback address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
