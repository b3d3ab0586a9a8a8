"""DICOM over TLS: the server's SSLContext, and the handshake of one connection.

The context follows DICOM's BCP 195 profile (PS3.15 B.9, the non-downgrading
one): TLS 1.2 or newer, forward-secret AEAD cipher suites only, no compression,
no renegotiation. With `tls_client_ca`, senders must present a certificate that
chains to one of its CAs, and *only* to those: the system's trust store is
never loaded, or any certificate from a public CA would get in.

The handshake runs in the connection's own thread with a deadline (not in the
accept loop, where pynetdicom's built-in TLS server does it): a connection that
never sends a ClientHello costs one thread for `tls_handshake_timeout` seconds
and blocks nobody.
"""

import select
import socket
import ssl
import time
from pathlib import Path

from scp.config import Config, ConfigError

# TLS 1.2 suites (TLS 1.3 ones are all AEAD and forward-secret, OpenSSL's
# defaults are kept). ECDHE/DHE with AES-GCM or ChaCha20-Poly1305: the suites of
# BCP 195 and of dcmtk's "Non-downgrading BCP 195 TLS Profile".
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL"


class _EncryptedKey(Exception):
    """OpenSSL asked for the private key's passphrase."""


def _ask_passphrase():
    # Without a callback OpenSSL would prompt on the terminal, and a service
    # has none: an encrypted key is a configuration error.
    raise _EncryptedKey


def _read(key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"key '{key}': cannot read {path}: {exc.strerror or exc}") from exc


def server_context(config: Config) -> ssl.SSLContext:
    """The SSLContext for the TLS listener; ConfigError naming the key when a
    file is missing, unreadable, not PEM, encrypted or does not match."""
    cert, key = config.tls_certificate, config.tls_private_key
    if b"-----BEGIN CERTIFICATE-----" not in _read("tls_certificate", cert):
        raise ConfigError(f"key 'tls_certificate': no PEM certificate in {cert}")
    key_text = _read("tls_private_key", key)
    if (
        b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in key_text
        or b"Proc-Type: 4,ENCRYPTED" in key_text
    ):
        raise ConfigError(
            f"key 'tls_private_key': {key} is encrypted; the service needs it unencrypted"
            " (readable by the service user only)"
        )
    if b"PRIVATE KEY-----" not in key_text:
        raise ConfigError(f"key 'tls_private_key': no PEM private key in {key}")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(_TLS12_CIPHERS)
    context.options |= (
        ssl.OP_NO_COMPRESSION
        | ssl.OP_CIPHER_SERVER_PREFERENCE
        | ssl.OP_SINGLE_DH_USE
        | ssl.OP_SINGLE_ECDH_USE
        | getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    )
    try:
        context.load_cert_chain(cert, key, password=_ask_passphrase)
    except _EncryptedKey as exc:
        raise ConfigError(
            f"key 'tls_private_key': {key} is encrypted; the service needs it unencrypted"
        ) from exc
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(
                f"key 'tls_private_key': {key} is not the key of the certificate in {cert}"
            ) from exc
        raise ConfigError(
            f"key 'tls_certificate': cannot load {cert} with the key {key}: {exc.reason or exc}"
        ) from exc
    except OSError as exc:  # the file went away between the read and the load
        raise ConfigError(f"key 'tls_certificate': cannot load {cert}: {exc}") from exc

    if config.tls_client_ca:
        ca = config.tls_client_ca
        try:
            if Path(ca).is_dir():  # a c_rehash'ed directory of CA certificates
                context.load_verify_locations(capath=ca)
            else:
                _read("tls_client_ca", ca)
                context.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"key 'tls_client_ca': no usable CA certificate in {ca}: {exc.reason or exc}"
            ) from exc
        except OSError as exc:
            raise ConfigError(f"key 'tls_client_ca': cannot read {ca}: {exc}") from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class HandshakeTimeout(TimeoutError):
    pass


def handshake(context: ssl.SSLContext, sock: socket.socket, timeout: float) -> ssl.SSLSocket:
    """Wrap an accepted TCP socket and complete the server side of the TLS
    handshake within `timeout` seconds *in all* (a peer trickling one byte at a
    time does not get a fresh timeout per byte). The returned socket keeps the
    timeout `sock` had. Raises ssl.SSLError, OSError or HandshakeTimeout; the
    caller closes the socket."""
    read_timeout = sock.gettimeout()
    tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    deadline = time.monotonic() + timeout
    tls.setblocking(False)
    try:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                wanted = select.POLLIN
            except ssl.SSLWantWriteError:
                wanted = select.POLLOUT
            remaining = deadline - time.monotonic()
            # poll(), not select(): select() fails on descriptors above 1023.
            poller = select.poll()
            poller.register(tls, wanted)
            if remaining <= 0 or not poller.poll(remaining * 1000):
                raise HandshakeTimeout(f"no TLS handshake within {timeout:g} s")
    except BaseException:
        tls.close()
        raise
    tls.settimeout(read_timeout)
    return tls


def describe(tls: ssl.SSLSocket) -> dict:
    """What was negotiated, for the log: protocol, cipher and the client's certificate."""
    info = {"protocol": tls.version(), "cipher": (tls.cipher() or ("",))[0]}
    peer = tls.getpeercert()
    if peer:
        info["client_subject"] = ",".join(
            f"{name}={value}" for rdn in peer.get("subject", ()) for name, value in rdn
        )
        info["client_not_after"] = peer.get("notAfter")
    return info
