"""DICOM TLS (PS3.15 B.9, the BCP 195 profiles): SSL contexts for the listener and for sends.

TLS 1.2 is the minimum. For TLS 1.2 only forward-secret AEAD suites are offered (ECDHE with
AES-GCM or ChaCha20-Poly1305, RFC 9325 4.2); TLS 1.3 uses OpenSSL's suites, all of which
qualify. A certificate or key that cannot be used raises :class:`TLSConfigError` naming the
setting and the file, so that the node refuses to start instead of failing per association.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from pathlib import Path

from dicom_node.config import ClientTLS, Destination, ServerTLS

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


class TLSConfigError(OSError):
    """A TLS certificate, key or CA bundle cannot be used; the message names the file.

    An ``OSError`` like ``ssl.SSLError``, so the places that turn a failure to open a port or
    a file into "cannot start" (``app.run``) do the same for it.
    """


def server_context(tls: ServerTLS, setting: str = "node.tls") -> ssl.SSLContext:
    """The listener's context; client certificates are checked against ``ca_bundle``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _restrict(context)
    _load_chain(context, tls.certificate, tls.private_key, setting)
    if tls.ca_bundle is None:
        context.verify_mode = ssl.CERT_NONE
    else:
        _load_ca_bundle(context, tls.ca_bundle, f"{setting}.ca_bundle")
        required = tls.require_client_certificate
        context.verify_mode = ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL
    return context


def client_context(tls: ClientTLS, setting: str = "tls") -> ssl.SSLContext:
    """The context for associations to a destination: its certificate is always verified."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED
    _restrict(context)
    context.check_hostname = tls.check_hostname
    if tls.ca_bundle is None:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        _load_ca_bundle(context, tls.ca_bundle, f"{setting}.ca_bundle")
    if tls.certificate is not None:  # a key without a certificate: ClientTLS refuses it
        _load_chain(context, tls.certificate, tls.private_key or tls.certificate, setting)
    return context


def destination_tls(destinations: Mapping[str, Destination]) -> dict[str, ClientTLS]:
    """The TLS settings by destination name, each tried once so that a bad file stops the start."""
    checked = {}
    for name, destination in destinations.items():
        if destination.tls is not None:
            client_context(destination.tls, f"destinations.{name}.tls")
            checked[name] = destination.tls
    return checked


def describe(context: ssl.SSLContext) -> str:
    """A log line's worth: minimum version and whether peer certificates are checked."""
    peers = {
        ssl.CERT_NONE: "not requested",
        ssl.CERT_OPTIONAL: "verified when sent",
        ssl.CERT_REQUIRED: "required",
    }[context.verify_mode]
    return f"minimum {context.minimum_version.name}, peer certificates {peers}"


def _restrict(context: ssl.SSLContext) -> None:
    context.minimum_version = MINIMUM_VERSION
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION


def _load_chain(
    context: ssl.SSLContext, certificate: Path, private_key: Path, setting: str
) -> None:
    _check_readable(certificate, f"{setting}.certificate")
    _check_readable(private_key, f"{setting}.private_key")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=certificate)
    except ssl.SSLError as exc:
        raise TLSConfigError(
            f"{setting}.certificate: no PEM certificate in {certificate} ({_reason(exc)})"
        ) from None
    try:
        context.load_cert_chain(certificate, private_key, password=_refuse_password)
    except _EncryptedKey:
        raise TLSConfigError(
            f"{setting}.private_key: {private_key} is encrypted; the node needs it unencrypted"
            " (readable only by the node's user)"
        ) from None
    except ssl.SSLError as exc:
        if private_key == certificate:  # no private_key given: the certificate's file
            raise TLSConfigError(
                f"{setting}.certificate: {certificate} holds no unencrypted PEM private key"
                f" matching it, and {setting}.private_key is not given ({_reason(exc)})"
            ) from None
        raise TLSConfigError(
            f"{setting}.private_key: {private_key} is not an unencrypted PEM private key"
            f" matching {certificate} ({_reason(exc)})"
        ) from None


def _load_ca_bundle(context: ssl.SSLContext, bundle: Path, setting: str) -> None:
    _check_readable(bundle, setting)
    try:
        context.load_verify_locations(cafile=bundle)
    except ssl.SSLError as exc:
        raise TLSConfigError(
            f"{setting}: no PEM CA certificate in {bundle} ({_reason(exc)})"
        ) from None


def _check_readable(path: Path, setting: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise TLSConfigError(f"{setting}: cannot read {path}: {exc.strerror}") from None


class _EncryptedKey(Exception):
    pass


def _refuse_password() -> bytes:
    """Called only for an encrypted key: never prompt on the terminal, fail instead."""
    raise _EncryptedKey


def _reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc)
