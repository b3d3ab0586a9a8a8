"""Who may read the index over HTTP: bearer tokens, kept as SHA-256 digests.

The tokens file (`web_tokens`) has one token per line: the hex SHA-256 digest of
the token, then a name for the logs (`sha256sum` of the token and a name):

    9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08  ris-1

A leaked file gives no token. SIGHUP re-reads it (scp.web.server). Without a
file, no token is asked for: the config allows that only on a loopback address.
"""

import hashlib
import re
import threading
from pathlib import Path

_LINE = re.compile(r"([0-9a-fA-F]{64})(?:\s+(\S.*))?")


class TokenFileError(ValueError):
    """A tokens file that cannot be read as one: the message names the line."""


class BearerTokens:
    """The accepted tokens, by digest; `reload` swaps them all at once."""

    def __init__(self, path: Path | None):
        self._path = path
        self._names: dict[str, str] = {}
        self._lock = threading.Lock()
        self.reload()

    @property
    def required(self) -> bool:
        return self._path is not None

    def reload(self) -> int:
        """Read the file again; how many tokens it holds. The old tokens stay
        when the new file cannot be read (TokenFileError, OSError)."""
        if self._path is None:
            return 0
        names = {}
        for number, line in enumerate(self._path.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            match = _LINE.fullmatch(line)
            if match is None:
                raise TokenFileError(
                    f"{self._path}:{number}: expected a SHA-256 hex digest and a name"
                )
            names[match.group(1).lower()] = (match.group(2) or f"line {number}").strip()
        with self._lock:
            self._names = names
        return len(names)

    def name_of(self, authorization: str | None) -> str | None:
        """The token's name when `authorization` is `Bearer <a known token>`."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        with self._lock:
            return self._names.get(digest)
