"""Development PKI: the server certificate chains to its CA only, keys are private, nothing is
overwritten by accident, and client keys land on the allow-list the verifier reads."""

from __future__ import annotations

import hashlib
import ipaddress
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from pollinate import security
from pollinate.errors import ConfigError
from pollinate.transport.grpc.auth import (
    AllowList,
    AuthError,
    Verifier,
    load_private_key,
    public_key_b64,
    sign,
)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("pki")
    ca_cert, ca_key = security.make_ca(out)
    cert, key = security.make_server_cert(out, ca_cert, ca_key)
    return {"out": out, "ca_cert": ca_cert, "ca_key": ca_key, "cert": cert, "key": key}


def _server_verifier(ca: x509.Certificate, name: x509.DNSName | x509.IPAddress):
    """cryptography's own path validation: chain to ``ca``, SAN match, usage and validity."""
    return PolicyBuilder().store(Store([ca])).build_server_verifier(name)


def test_server_cert_is_issued_by_the_ca(pki):
    ca, cert = _cert(pki["ca_cert"]), _cert(pki["cert"])
    cert.verify_directly_issued_by(ca)
    for name in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        chain = _server_verifier(ca, name).verify(cert, [])
        assert chain[0] == cert and chain[-1] == ca


def test_server_cert_names_the_default_hosts(pki):
    cert = _cert(pki["cert"])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    with pytest.raises(VerificationError):
        _server_verifier(_cert(pki["ca_cert"]), x509.DNSName("evil.example.org")).verify(cert, [])


def test_validity_periods(pki):
    ca, cert = _cert(pki["ca_cert"]), _cert(pki["cert"])
    now = datetime.now(timezone.utc)
    assert ca.not_valid_before_utc <= now and cert.not_valid_before_utc <= now
    assert timedelta(days=3640) < ca.not_valid_after_utc - now <= timedelta(days=3650)
    assert timedelta(days=360) < cert.not_valid_after_utc - now <= timedelta(days=365)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_private_keys_are_0600_and_match_their_certificates(pki):
    assert _mode(pki["ca_key"]) == 0o600
    assert _mode(pki["key"]) == 0o600
    assert _mode(pki["cert"]) == 0o644
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    for key_path, cert_path in ((pki["key"], pki["cert"]), (pki["ca_key"], pki["ca_cert"])):
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert key.public_key().public_bytes(der, spki) == _cert(
            cert_path
        ).public_key().public_bytes(der, spki)


def test_a_second_ca_does_not_vouch_for_the_server(pki, tmp_path):
    other_ca_path, _ = security.make_ca(tmp_path)
    other_ca, cert = _cert(other_ca_path), _cert(pki["cert"])
    assert other_ca.subject != _cert(pki["ca_cert"]).subject  # each dev CA has its own name
    with pytest.raises((ValueError, InvalidSignature)):
        cert.verify_directly_issued_by(other_ca)
    with pytest.raises(VerificationError):
        _server_verifier(other_ca, x509.DNSName("localhost")).verify(cert, [])


def test_a_forged_issuer_name_does_not_verify(pki, tmp_path):
    """Same subject name as the real CA, different key: the signature check must catch it."""
    real_ca = _cert(pki["ca_cert"])
    _, impostor_key_path = security.make_ca(tmp_path)
    impostor_key = serialization.load_pem_private_key(impostor_key_path.read_bytes(), None)
    impostor = (
        x509.CertificateBuilder()
        .subject_name(real_ca.subject)
        .issuer_name(real_ca.subject)
        .public_key(impostor_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(real_ca.not_valid_before_utc)
        .not_valid_after(real_ca.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(impostor_key, hashes.SHA256())
    )
    with pytest.raises(InvalidSignature):
        _cert(pki["cert"]).verify_directly_issued_by(impostor)


def test_custom_hosts_become_ip_and_dns_sans(pki, tmp_path):
    cert_path, _ = security.make_server_cert(
        tmp_path,
        pki["ca_cert"],
        pki["ca_key"],
        ["10.0.0.5", "[::1]", "FL.Example.org", "10.0.0.5"],
    )
    cert = _cert(cert_path)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("::1"),
    ]
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    _server_verifier(_cert(pki["ca_cert"]), x509.DNSName("fl.example.org")).verify(cert, [])


@pytest.mark.parametrize("hosts", [[], ["server:8080"], ["two words"], [""]])
def test_bad_hosts_are_refused(pki, tmp_path, hosts):
    with pytest.raises(ConfigError, match="host"):
        security.make_server_cert(tmp_path, pki["ca_cert"], pki["ca_key"], hosts)
    assert not (tmp_path / "server.key").exists()


def test_a_ca_key_that_does_not_match_is_refused(pki, tmp_path):
    _, other_key = security.make_ca(tmp_path / "other")
    with pytest.raises(ConfigError, match="is not the key of the CA certificate"):
        security.make_server_cert(tmp_path, pki["ca_cert"], other_key)
    with pytest.raises(ConfigError, match="cannot read the CA .*pollinate certs"):
        security.make_server_cert(tmp_path, tmp_path / "no-ca.crt", other_key)
    with pytest.raises(ConfigError, match="not a CA certificate"):
        security.make_server_cert(tmp_path, pki["cert"], pki["key"])


def test_existing_files_are_not_overwritten_unless_asked(tmp_path):
    ca_cert, ca_key = security.make_ca(tmp_path)
    before = ca_key.read_bytes()
    with pytest.raises(ConfigError, match=r"refusing to overwrite .*ca\.(crt|key)"):
        security.make_ca(tmp_path)
    assert ca_key.read_bytes() == before
    security.make_ca(tmp_path, overwrite=True)
    assert ca_key.read_bytes() != before and _mode(ca_key) == 0o600
    security.make_server_cert(tmp_path, ca_cert, ca_key)
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        security.make_server_cert(tmp_path, ca_cert, ca_key)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_client_key_files_and_allow_list(tmp_path):
    allow = tmp_path / "server" / "allow-list.txt"
    allow.parent.mkdir()
    key_path, public = security.make_client_key(tmp_path / "keys", 3, allow)
    assert key_path.name == "client-3.key" and _mode(key_path) == 0o600
    pub_path = key_path.with_name("client-3.pub")
    assert pub_path.read_text() == public + "\n"
    key = load_private_key(key_path)
    assert public_key_b64(key) == public
    assert allow.read_text() == f"3 {public}\n"

    security.make_client_key(tmp_path / "keys", 4, allow)
    assert [line.split()[0] for line in allow.read_text().splitlines()] == ["3", "4"]

    # end to end: the key the tool wrote signs what the server's verifier accepts
    verifier = Verifier(AllowList.load(allow))
    digest = hashlib.sha256(b"weights").digest()
    verifier.verify("train", 3, digest, sign(key, "train", 3, digest))
    with pytest.raises(AuthError, match="bad signature"):
        verifier.verify("train", 4, digest, sign(key, "train", 4, digest))


def test_client_key_refuses_overwrite_and_duplicate_ids(tmp_path):
    allow = tmp_path / "allow-list.txt"
    key_path, public = security.make_client_key(tmp_path, 5, allow)
    before_key, before_allow = key_path.read_bytes(), allow.read_bytes()
    with pytest.raises(ConfigError, match="refusing to overwrite .*client-5"):
        security.make_client_key(tmp_path, 5, allow)
    # a new key for an id already listed with another key: refused before any file changes
    with pytest.raises(
        ConfigError, match="client 5 is already on the allow-list .*delete its line"
    ):
        security.make_client_key(tmp_path, 5, allow, overwrite=True)
    assert key_path.read_bytes() == before_key and allow.read_bytes() == before_allow
    # re-adding the same entry is a no-op
    assert security.add_to_allow_list(allow, 5, public) is False
    assert allow.read_bytes() == before_allow
    with pytest.raises(ConfigError, match="non-negative integer"):
        security.make_client_key(tmp_path, -1)


def test_add_to_allow_list_keeps_existing_lines(tmp_path):
    allow = tmp_path / "allow-list.txt"
    allow.write_text("# operators: edit freely\n")
    allow.chmod(0o640)
    _, public = security.make_client_key(tmp_path, 1)
    allow.write_text(allow.read_text() + f"1 {public}")  # no trailing newline
    _, public2 = security.make_client_key(tmp_path, 2, allow)
    assert allow.read_text() == f"# operators: edit freely\n1 {public}\n2 {public2}\n"
    assert _mode(allow) == 0o640
    with pytest.raises(ConfigError, match="not a public key"):
        security.add_to_allow_list(allow, 9, "garbage")
    allow.write_text("1 broken\n")
    with pytest.raises(ConfigError, match="line 1"):
        security.add_to_allow_list(allow, 2, public2)
