"""Certificates and keys for a deployment: what `pollinate certs` and `pollinate keys` write.

TLS: the server presents ``server.crt`` / ``server.key``, signed by a CA (``ca.crt`` /
``ca.key``) that clients trust; the certificate names every host the server is dialled at
(IP addresses as IP SANs, names as DNS SANs). CA and server keys are ECDSA P-256, which every
TLS stack accepts. The CA made here is a development CA: keep ``ca.key`` off the server, or use
your organisation's CA instead.

Client identity: each client has an Ed25519 key pair, ``client-<id>.key`` (PEM, 0600) and
``client-<id>.pub`` (base64 of the raw public key); the server's allow-list holds one line
``<id> <base64 public key>`` per client (see ``pollinate.transport.grpc.auth``).

Private keys are written 0600, certificates and public keys 0644; an existing file is never
overwritten unless ``overwrite=True``, and every file is written atomically (temp + rename).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

from pollinate.errors import ConfigError, missing_dependency
from pollinate.transport.grpc.auth import load_public_key_b64, parse_allow_list, public_key_b64

try:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
except ImportError as e:  # pragma: no cover - depends on the environment
    raise missing_dependency("cryptography", "deploy") from e

__all__ = [
    "CA_DAYS",
    "DEFAULT_HOSTS",
    "SERVER_DAYS",
    "add_to_allow_list",
    "make_ca",
    "make_client_key",
    "make_server_cert",
]

CA_DAYS = 3650
SERVER_DAYS = 365
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
_BACKDATE = timedelta(minutes=5)  # tolerate clocks slightly behind the one that issued


# ------------------------------------------------------------------------------------- files


def _refuse_existing(paths: Iterable[Path], overwrite: bool) -> None:
    if overwrite:
        return
    for path in paths:
        if path.exists():
            raise ConfigError(
                f"refusing to overwrite {path}: delete it first, or ask to overwrite it "
                "(overwrite=True; --force on the command line)"
            )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically, with permissions ``mode`` from the first byte."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask may have removed bits from ``mode``
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _out_dir(out_dir: str | os.PathLike[str]) -> Path:
    out = Path(out_dir)
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the folder {out}: {e.strerror}") from e
    return out


def _private_pem(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# ------------------------------------------------------------------------------------------ TLS


def make_ca(
    out_dir: str | os.PathLike[str],
    *,
    common_name: str = "pollinate development CA",
    days: int = CA_DAYS,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Create a CA: ``ca.crt`` (give it to clients) and ``ca.key`` (0600); return both paths.

    A short random suffix makes each CA's name unique, so two development CAs never collide.
    """
    out = _out_dir(out_dir)
    cert_path, key_path = out / "ca.crt", out / "ca.key"
    _refuse_existing([cert_path, key_path], overwrite)
    if days < 1:
        raise ConfigError(f"a CA must be valid for at least 1 day, got days={days}")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pollinate"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{common_name} {secrets.token_hex(4)}"),
        ]
    )
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _private_pem(key), 0o600)
    _write(cert_path, _cert_pem(cert), 0o644)
    return cert_path, key_path


def make_server_cert(
    out_dir: str | os.PathLike[str],
    ca_cert: str | os.PathLike[str],
    ca_key: str | os.PathLike[str],
    hosts: Sequence[str] = DEFAULT_HOSTS,
    *,
    days: int = SERVER_DAYS,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Create ``server.crt`` and ``server.key`` (0600) signed by the CA, valid for ``hosts``.

    ``hosts`` are the addresses clients dial: IP addresses become IP SANs, names DNS SANs.
    The certificate never outlives its CA. Returns (certificate path, key path).
    """
    out = _out_dir(out_dir)
    cert_path, key_path = out / "server.crt", out / "server.key"
    _refuse_existing([cert_path, key_path], overwrite)
    if days < 1:
        raise ConfigError(f"a certificate must be valid for at least 1 day, got days={days}")
    names = _subject_alt_names(hosts)
    ca, signer = _load_ca(Path(ca_cert), Path(ca_key))
    now = datetime.now(timezone.utc)
    if ca.not_valid_after_utc <= now:
        raise ConfigError(f"the CA {ca_cert} expired on {ca.not_valid_after_utc:%Y-%m-%d}")
    first = str(hosts[0]).strip("[] ")
    common_name = first if len(first) <= 64 else "pollinate server"
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(now + timedelta(days=days), ca.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
            critical=False,
        )
        .sign(signer, hashes.SHA256())
    )
    _write(key_path, _private_pem(key), 0o600)
    _write(cert_path, _cert_pem(cert), 0o644)
    return cert_path, key_path


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    if isinstance(hosts, str):
        hosts = [hosts]
    names: list[x509.GeneralName] = []
    for host in hosts:
        text = str(host).strip().strip("[]")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(text)))
            continue
        except ValueError:
            pass
        if not text or ":" in text or "/" in text or any(c.isspace() for c in text):
            raise ConfigError(
                f"{host!r} is not a host name or IP address; give the hosts clients dial, "
                "without a port, e.g. 127.0.0.1 localhost server.example.org"
            )
        try:
            ascii_name = text.encode("idna").decode("ascii")
        except UnicodeError as e:
            raise ConfigError(f"{host!r} is not a valid host name ({e})") from e
        names.append(x509.DNSName(ascii_name.lower()))
    if not names:
        raise ConfigError("a server certificate needs at least one host, e.g. 127.0.0.1")
    return list(dict.fromkeys(names))  # drop duplicates, keep order


def _load_ca(
    cert_path: Path, key_path: Path
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        ca = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as e:
        raise ConfigError(
            f"cannot read the CA ({e.filename}: {e.strerror}); create one with `pollinate certs`"
        ) from e
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"{cert_path} / {key_path} are not a PEM certificate and unencrypted key ({e})"
        ) from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{key_path} is a {type(key).__name__}; expected an ECDSA CA key")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != ca.public_key().public_bytes(der, spki):
        raise ConfigError(f"{key_path} is not the key of the CA certificate {cert_path}")
    try:
        is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ConfigError(f"{cert_path} is not a CA certificate (no BasicConstraints CA=true)")
    return ca, key


# ------------------------------------------------------------------------------- client keys


def make_client_key(
    out_dir: str | os.PathLike[str],
    client_id: int,
    allow_list_path: str | os.PathLike[str] | None = None,
    *,
    overwrite: bool = False,
) -> tuple[Path, str]:
    """Create ``client-<id>.key`` (Ed25519, PEM, 0600) and ``client-<id>.pub`` (base64).

    With ``allow_list_path``, also add the line ``<id> <public key>`` to that allow-list
    (created if missing); a client id already listed with another key is refused before any
    file is written. Returns (private key path, base64 public key).
    """
    if isinstance(client_id, bool) or not isinstance(client_id, int) or client_id < 0:
        raise ConfigError(f"a client id is a non-negative integer, got {client_id!r}")
    out = _out_dir(out_dir)
    key_path, pub_path = out / f"client-{client_id}.key", out / f"client-{client_id}.pub"
    _refuse_existing([key_path, pub_path], overwrite)
    key = Ed25519PrivateKey.generate()
    public = public_key_b64(key)
    if allow_list_path is not None:
        _listed_key(Path(allow_list_path), client_id, public)  # refuse a conflict first
    _write(key_path, _private_pem(key), 0o600)
    _write(pub_path, (public + "\n").encode("ascii"), 0o644)
    if allow_list_path is not None:
        add_to_allow_list(allow_list_path, client_id, public)
    return key_path, public


def add_to_allow_list(path: str | os.PathLike[str], client_id: int, public_b64: str) -> bool:
    """Add ``<client_id> <public_b64>`` to an allow-list file (created if missing).

    Returns False if that exact entry is already there; refuses (``ConfigError``) a client id
    listed with a different key. The file is replaced atomically, so a running server never
    reads half a line.
    """
    p = Path(path)
    public = public_b64.strip()
    load_public_key_b64(public)  # validate
    if _listed_key(p, client_id, public):
        return False
    old = p.read_bytes() if p.exists() else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    mode = p.stat().st_mode & 0o777 if p.exists() else 0o644
    _write(p, old + f"{client_id} {public}\n".encode("ascii"), mode)
    return True


def _listed_key(path: Path, client_id: int, public: str) -> bool:
    """Whether ``client_id`` is listed with ``public``; ConfigError if with another key."""
    if not path.exists():
        return False
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read the allow-list {path}: {e.strerror}") from e
    listed = parse_allow_list(data, source=str(path)).get(client_id)
    if listed is None:
        return False
    if public_key_b64(listed) != public:
        raise ConfigError(
            f"client {client_id} is already on the allow-list {path} with a different key; "
            "to replace its key, delete its line there first, then run this again"
        )
    return True
