"""Client authentication: signatures bind every field, the allow-list is live, replays fail."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pollinate.errors import ConfigError, PollinateError
from pollinate.transport.grpc import auth
from pollinate.transport.grpc.auth import (
    AllowList,
    AuthError,
    NonceCache,
    Signature,
    Verifier,
    canonical_bytes,
    parse_allow_list,
    public_key_b64,
    sign,
)

DIGEST = hashlib.sha256(b"the payload").digest()


def _write_allow_list(path: Path, keys: dict[int, Ed25519PrivateKey], mtime: float) -> None:
    path.write_text("".join(f"{cid} {public_key_b64(k)}\n" for cid, k in keys.items()))
    os.utime(path, (mtime, mtime))


@pytest.fixture
def keys() -> dict[int, Ed25519PrivateKey]:
    return {3: Ed25519PrivateKey.generate(), 4: Ed25519PrivateKey.generate()}


@pytest.fixture
def allow_path(tmp_path: Path, keys: dict[int, Ed25519PrivateKey]) -> Path:
    path = tmp_path / "allow-list.txt"
    _write_allow_list(path, keys, time.time() - 100)
    return path


@pytest.fixture
def verifier(allow_path: Path) -> Verifier:
    return Verifier(AllowList.load(allow_path))


def test_sign_verify_round_trip(verifier, keys):
    sig = sign(keys[3], "train", 3, DIGEST)
    assert len(sig.nonce) == 16 and len(sig.signature) == 64
    assert abs(sig.timestamp - time.time()) < 60
    verifier.verify("train", 3, DIGEST, sig)
    verifier.verify("register", 4, b"", sign(keys[4], "register", 4, b""))
    assert verifier.authenticates


@pytest.mark.parametrize(
    "field",
    ["kind", "client_id", "digest", "timestamp", "nonce", "signature_bit"],
)
def test_any_tampered_field_is_refused(verifier, keys, field):
    sig = sign(keys[3], "train", 3, DIGEST)
    kind, client_id, digest = "train", 3, DIGEST
    if field == "kind":
        kind = "evaluate"
    elif field == "client_id":
        client_id = 4  # listed, but 3 signed: another client's identity cannot be borrowed
    elif field == "digest":
        digest = hashlib.sha256(b"another payload").digest()
    elif field == "timestamp":
        sig = replace(sig, timestamp=sig.timestamp + 1.0)  # still within the allowed skew
    elif field == "nonce":
        sig = replace(sig, nonce=bytes(16))
    else:
        sig = replace(sig, signature=bytes([sig.signature[0] ^ 1]) + sig.signature[1:])
    with pytest.raises(AuthError, match="bad signature") as err:
        verifier.verify(kind, client_id, digest, sig)
    assert f"client {client_id}" in str(err.value)
    verifier.verify("train", 3, DIGEST, sign(keys[3], "train", 3, DIGEST))  # honest still works


def test_wrong_key_is_refused(verifier):
    stranger = Ed25519PrivateKey.generate()
    sig = sign(stranger, "register", 3, b"")
    with pytest.raises(AuthError, match="bad signature"):
        verifier.verify("register", 3, b"", sig)
    # a request that carries its public key gets the clearer reason
    with pytest.raises(AuthError, match="does not match its line"):
        verifier.verify("register", 3, b"", sig, public_key=public_key_b64(stranger))


def test_matching_public_key_or_none_is_accepted(verifier, keys):
    verifier.verify(
        "register", 3, b"", sign(keys[3], "register", 3, b""), public_key=public_key_b64(keys[3])
    )
    verifier.verify("register", 3, b"", sign(keys[3], "register", 3, b""), public_key="")


def test_unknown_client_is_refused_with_the_fix(verifier):
    key = Ed25519PrivateKey.generate()
    with pytest.raises(AuthError) as err:
        verifier.verify("register", 9, b"", sign(key, "register", 9, b""))
    message = str(err.value)
    assert "client 9 is not on the server's allow-list" in message
    assert "pollinate keys" in message and "client-9.pub" in message
    assert isinstance(err.value, PollinateError)


def test_removing_a_line_revokes_without_restart(allow_path, verifier, keys):
    verifier.verify("train", 3, DIGEST, sign(keys[3], "train", 3, DIGEST))
    _write_allow_list(allow_path, {4: keys[4]}, time.time() - 50)
    with pytest.raises(AuthError, match=r"client 3 was removed .*\(revoked\)") as err:
        verifier.verify("train", 3, DIGEST, sign(keys[3], "train", 3, DIGEST))
    assert "pollinate keys" in str(err.value)
    verifier.verify("train", 4, DIGEST, sign(keys[4], "train", 4, DIGEST))
    # putting the line back re-admits the client
    _write_allow_list(allow_path, keys, time.time() - 20)
    verifier.verify("train", 3, DIGEST, sign(keys[3], "train", 3, DIGEST))


def test_a_same_size_edit_is_noticed(allow_path, verifier, keys):
    """Replacing a key keeps the file's size; the changed mtime alone must trigger a reload."""
    size = allow_path.stat().st_size
    new_key = Ed25519PrivateKey.generate()
    _write_allow_list(allow_path, {3: new_key, 4: keys[4]}, time.time() - 50)
    assert allow_path.stat().st_size == size
    with pytest.raises(AuthError, match="bad signature"):
        verifier.verify("train", 3, DIGEST, sign(keys[3], "train", 3, DIGEST))
    verifier.verify("train", 3, DIGEST, sign(new_key, "train", 3, DIGEST))


def test_adding_a_line_admits_a_new_client(allow_path, verifier, keys):
    newcomer = Ed25519PrivateKey.generate()
    with pytest.raises(AuthError, match="not on the server's allow-list"):
        verifier.verify("register", 7, b"", sign(newcomer, "register", 7, b""))
    with allow_path.open("a") as f:
        f.write(f"7 {public_key_b64(newcomer)}  # added later\n")
    verifier.verify("register", 7, b"", sign(newcomer, "register", 7, b""))


def test_a_broken_allow_list_refuses_everyone_until_fixed(allow_path, verifier, keys):
    good = allow_path.read_text()
    allow_path.write_text(good + "8 half-a-li")
    with pytest.raises(AuthError, match="allow-list file is unreadable or malformed"):
        verifier.verify("train", 3, DIGEST, sign(keys[3], "train", 3, DIGEST))
    allow_path.unlink()
    with pytest.raises(AuthError, match="allow-list file"):
        verifier.verify("train", 3, DIGEST, sign(keys[3], "train", 3, DIGEST))
    allow_path.write_text(good)
    verifier.verify("train", 3, DIGEST, sign(keys[3], "train", 3, DIGEST))


def test_replayed_signature_is_refused(verifier, keys):
    sig = sign(keys[3], "train", 3, DIGEST)
    verifier.verify("train", 3, DIGEST, sig)
    with pytest.raises(AuthError, match=r"replayed request \(nonce seen before\)"):
        verifier.verify("train", 3, DIGEST, sig)


def test_replay_is_refused_by_a_new_verifier_sharing_the_nonce_store(allow_path, keys):
    """A server passing its SQLite-backed ``seen_nonce`` refuses replays across restarts."""
    store: dict[bytes, float] = {}

    def seen_nonce(nonce: bytes, expires_at: float) -> bool:
        if nonce in store:
            return True
        store[nonce] = expires_at
        return False

    sig = sign(keys[3], "train", 3, DIGEST)
    Verifier(AllowList.load(allow_path), seen_nonce).verify("train", 3, DIGEST, sig)
    assert store == {sig.nonce: sig.timestamp + auth.DEFAULT_MAX_SKEW_S}
    restarted = Verifier(AllowList.load(allow_path), seen_nonce)
    with pytest.raises(AuthError, match="replayed"):
        restarted.verify("train", 3, DIGEST, sig)


def test_an_invalid_request_does_not_burn_the_nonce(allow_path, keys):
    """A forged copy sent first must not make the genuine request look like a replay."""
    calls: list[bytes] = []

    def seen_nonce(nonce: bytes, expires_at: float) -> bool:
        seen = nonce in calls
        calls.append(nonce)
        return seen

    verifier = Verifier(AllowList.load(allow_path), seen_nonce)
    sig = sign(keys[3], "train", 3, DIGEST)
    with pytest.raises(AuthError, match="bad signature"):
        verifier.verify("train", 3, b"forged digest", sig)
    old = sign(keys[3], "train", 3, DIGEST, timestamp=time.time() - 1000)
    with pytest.raises(AuthError, match="timestamp"):
        verifier.verify("train", 3, DIGEST, old)
    assert calls == []
    verifier.verify("train", 3, DIGEST, sig)
    assert calls == [sig.nonce]


@pytest.mark.parametrize(("offset", "side"), [(-400.0, "behind"), (400.0, "ahead of")])
def test_timestamps_off_the_clock_are_refused(verifier, keys, offset, side):
    sig = sign(keys[3], "train", 3, DIGEST, timestamp=time.time() + offset)
    with pytest.raises(AuthError, match=rf"timestamp 400 s {side} the server's clock") as err:
        verifier.verify("train", 3, DIGEST, sig)
    assert "client 3" in str(err.value) and "NTP" in str(err.value)


def test_skew_bound_is_inclusive_and_configurable(allow_path, keys):
    now = 10_000.0
    verifier = Verifier(AllowList.load(allow_path), max_skew_s=30.0, clock=lambda: now)
    verifier.verify("train", 3, DIGEST, sign(keys[3], "train", 3, DIGEST, timestamp=now - 30.0))
    with pytest.raises(AuthError, match="timestamp"):
        verifier.verify("train", 3, DIGEST, sign(keys[3], "train", 3, DIGEST, timestamp=now - 31))
    with pytest.raises(ConfigError, match="max_skew_s"):
        Verifier(None, max_skew_s=0)


def test_a_replay_after_the_nonce_expired_fails_on_the_timestamp(allow_path, keys):
    clock = [1_000.0]
    store = NonceCache(lambda: clock[0])
    verifier = Verifier(AllowList.load(allow_path), store, clock=lambda: clock[0])
    sig = sign(keys[3], "train", 3, DIGEST, timestamp=1_000.0)
    verifier.verify("train", 3, DIGEST, sig)
    assert len(store) == 1
    clock[0] = 1_000.0 + auth.DEFAULT_MAX_SKEW_S + 1
    with pytest.raises(AuthError, match="timestamp"):
        verifier.verify("train", 3, DIGEST, sig)
    fresh = sign(keys[3], "train", 3, DIGEST, timestamp=clock[0])
    verifier.verify("train", 3, DIGEST, fresh)
    assert len(store) == 1  # the expired nonce was pruned when the fresh one was recorded


def test_nonce_cache_prunes_as_it_goes():
    clock = [0.0]
    cache = NonceCache(lambda: clock[0])
    for i in range(100):
        assert cache(i.to_bytes(16, "big"), expires_at=10.0 + i) is False
    assert cache((5).to_bytes(16, "big"), 999.0) is True
    assert len(cache) == 100
    clock[0] = 60.0  # expiries 10..59 have passed
    assert cache(b"n" * 16, 1000.0) is False
    assert len(cache) == 51
    assert cache((5).to_bytes(16, "big"), 999.0) is False  # forgotten: recorded anew


def test_concurrent_replays_admit_exactly_one(verifier, keys):
    sig = sign(keys[3], "train", 3, DIGEST)
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def attempt() -> None:
        barrier.wait()
        try:
            verifier.verify("train", 3, DIGEST, sig)
            outcomes.append("ok")
        except AuthError:
            outcomes.append("refused")

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["ok"] + ["refused"] * 7


@pytest.mark.parametrize(
    ("client_id", "sig_changes", "problem"),
    [
        (3, {"nonce": b"short"}, "nonce must be 16 bytes"),
        (3, {"signature": b"x" * 10}, "signature must be 64 bytes"),
        (3, {"timestamp": math.nan}, "not a finite number"),
        (3, {"timestamp": math.inf}, "not a finite number"),
        (-1, {}, "not a non-negative integer"),
        (True, {}, "not a non-negative integer"),
    ],
)
def test_malformed_requests_are_refused_before_any_crypto(
    verifier, keys, client_id, sig_changes, problem
):
    sig = replace(sign(keys[3], "train", 3, DIGEST), **sig_changes)
    with pytest.raises(AuthError, match=f"malformed signed request.*{problem}"):
        verifier.verify("train", client_id, DIGEST, sig)


def test_without_an_allow_list_everyone_is_accepted():
    verifier = Verifier(None)
    assert not verifier.authenticates
    verifier.verify("register", 12, b"", Signature(0.0, b"", b""))


def test_canonical_bytes_are_unambiguous():
    nonce = bytes(range(16))
    a = canonical_bytes("train", 12, 1.5, nonce, b"d")
    b = canonical_bytes("train1", 2, 1.5, nonce, b"d")
    c = canonical_bytes("train", 1, 1.5, nonce, b"2d")
    assert len({a, b, c}) == 3
    assert a.startswith(len(b"pollinate-v1").to_bytes(4, "big") + b"pollinate-v1")
    assert canonical_bytes("train", 12, 1.5, nonce, b"d") == a  # deterministic
    assert canonical_bytes("train", 12, 1, nonce, b"d") == canonical_bytes(
        "train", 12, 1.0, nonce, b"d"
    )


def test_sign_refuses_a_nonce_of_the_wrong_size():
    with pytest.raises(ConfigError, match="16 bytes"):
        sign(Ed25519PrivateKey.generate(), "train", 1, DIGEST, nonce=b"abc")


def test_allow_list_accepts_comments_blank_lines_and_identical_repeats(keys):
    k3, k4 = public_key_b64(keys[3]), public_key_b64(keys[4])
    text = f"# clients of the Lyon site\n\n3 {k3}   # alice\n  4\t{k4}\n3 {k3}\n"
    parsed = parse_allow_list(text)
    assert sorted(parsed) == [3, 4]
    assert public_key_b64(parsed[4]) == k4
    allow = AllowList.from_text(text)
    assert allow.client_ids() == [3, 4] and len(allow) == 2 and 3 in allow and 5 not in allow
    assert allow.path is None


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("3", "expected '<client_id> <base64 public key>'"),
        ("3 {key} extra", "expected '<client_id> <base64 public key>'"),
        ("alice {key}", "client id 'alice' is not a non-negative integer"),
        ("-3 {key}", "client id '-3' is not a non-negative integer"),
        ("3 not-base64!!", "the key of client 3 is not base64 of a 32-byte"),
        ("3 AAAA", "the key of client 3 is not base64 of a 32-byte"),
        ("4 {key}", "client 4 is listed again with a different key \\(first on line 2\\)"),
    ],
)
def test_malformed_allow_list_lines_name_the_line(tmp_path, keys, line, expected):
    k3, k4 = public_key_b64(keys[3]), public_key_b64(keys[4])
    text = f"# header\n4 {k4}\n\n{line.format(key=k3)}\n"
    with pytest.raises(ConfigError, match=rf"line 4: {expected}"):
        parse_allow_list(text)
    path = tmp_path / "allow.txt"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"{path}, line 4: {expected}"):
        AllowList.load(path)


def test_missing_or_binary_allow_list_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the allow-list file"):
        AllowList.load(tmp_path / "nope.txt")
    path = tmp_path / "allow.bin"
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8"):
        AllowList.load(path)


def test_key_loading_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the client key .*pollinate keys"):
        auth.load_private_key(tmp_path / "missing.key")
    junk = tmp_path / "junk.key"
    junk.write_text("not a key")
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        auth.load_private_key(junk)
    ec_key = tmp_path / "ec.key"
    ec_key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ConfigError, match="not an Ed25519 key"):
        auth.load_private_key(ec_key)
    with pytest.raises(ConfigError, match="not a public key"):
        auth.load_public_key_b64("AAAA")


def test_public_key_text_round_trips():
    key = Ed25519PrivateKey.generate()
    text = public_key_b64(key)
    assert public_key_b64(key.public_key()) == text
    loaded = auth.load_public_key_b64(f"  {text}\n")
    loaded.verify(key.sign(b"m"), b"m")


def test_auth_and_security_do_not_import_grpc():
    code = (
        "import sys, pollinate.transport, pollinate.transport.grpc, "
        "pollinate.transport.grpc.auth, pollinate.security; "
        "print('grpc' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
