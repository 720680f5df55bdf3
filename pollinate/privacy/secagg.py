"""Secure aggregation: the server learns the sum of the clients' vectors and nothing else.

SecAgg+ (Bell, Bonawitz, Gascón, Lepoint & Raykova 2020, ePrint 2020/704) on top of SecAgg
(Bonawitz et al. 2017, ePrint 2017/281), one round, semi-honest server. Every client ``u``
quantizes its vector ``x_u`` to integers (``quantize``) and sends

    y_u = q(x_u) + PRG(b_u) + Σ_{v ∈ N(u) ∩ U2} sign(u, v)·PRG(s_uv)   (mod 2^m)

with ``sign(u, v) = +1`` if ``u < v`` else ``-1``. ``b_u`` is a fresh 32-byte self-mask seed;
``s_uv = HKDF(X25519(s_sk_u, s_pk_v))`` is a seed ``u`` shares with its neighbour ``v``, so
``v`` adds the same stream with the opposite sign and, in the sum over the survivors U3, the
pairwise masks between survivors cancel. The server asks the survivors for Shamir shares
(t of k) of ``b_w`` for each survivor ``w`` and of ``s_sk_w`` for each client ``w`` that
dropped after sharing its secrets, removes ``PRG(b_w)`` and the dropped clients' pairwise
masks, and dequantizes ``Σ y = Σ q(x)`` (``dequantize``). An honest client answers only one
of the two questions about any client (survivors and dropped lists must not intersect), and
only once a round, so the server never holds both secrets of anyone.

Neighbours (SecAgg+): the clients are relabelled by a random permutation and placed on a
ring; each is connected to its k nearest (``neighbour_graph``, a Harary graph H(k, n)). k is
at least 2 for n >= 3, so the graph is connected (on a disconnected graph the server would
learn the sum of each component). Pairwise masks and shares only go between neighbours: a
client does k key agreements and k + 1 PRG expansions instead of n.

Stages, with the functions each side calls::

    1 keys     client_keys -> SecAggServer.add_keys
    2 shares   SecAggServer.neighbours_public -> client_shares -> SecAggServer.add_shares
    3 masked   SecAggServer.shares_for -> client_mask -> SecAggServer.add_masked
    4 unmask   SecAggServer.unmask_request -> client_unmask -> SecAggServer.add_reveal
               SecAggServer.result

The server closes a stage the first time it serves the next one (``neighbours_public``
closes stage 1, ``shares_for`` stage 2), so every client sees the same set of peers.

Crypto (``cryptography``): X25519 key agreement; HKDF-SHA256 with ``info`` binding the purpose
and the round ``tag``; AES-256-GCM for the shares, with associated data binding the round
tag, the sender and the receiver; ChaCha20 keystream as the PRG. Shamir shares live in the
field of the prime ``2^521 − 1``; the share for client ``v`` is the polynomial at ``v + 1``.

Security notes. The threshold should exceed k/2 (the default 0.6 does): then even a server
that tells different neighbours different stories cannot collect t shares of both secrets of
a client. A client that received fewer than t neighbours' shares refuses to mask (its input
would be protected by too few pairwise masks). ``quantize`` clips each coordinate to
``[-clip_range, clip_range]``; the result is off by at most ``count · quantum() / 2`` per
coordinate, and the modulus must hold the sum of all quantized inputs (``SecAggConfig.check``).

Wire formats are ASCII base64: public keys (64 bytes: c_pk ‖ s_pk), ciphertexts (12-byte
nonce ‖ AES-GCM ciphertext of two 66-byte big-endian shares), revealed shares (66 bytes).
Anything malformed raises ``SecAggError`` naming the client (``SecAggError`` ⊂
``PrivacyError`` ⊂ ``PollinateError``); a bad configuration raises ``ConfigError``.
"""

from __future__ import annotations

import base64
import binascii
import math
import numbers
import operator
import os
import secrets
import struct
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pollinate.errors import ConfigError, missing_dependency
from pollinate.privacy.accounting import PrivacyError

try:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
except ImportError as e:  # pragma: no cover - depends on the environment
    raise missing_dependency("cryptography", "privacy") from e

__all__ = [
    "PRIME",
    "SecAggConfig",
    "SecAggError",
    "SecAggServer",
    "client_keys",
    "client_mask",
    "client_shares",
    "client_unmask",
    "dequantize",
    "neighbour_graph",
    "prg",
    "quantize",
    "shamir_reconstruct",
    "shamir_split",
]

#: the Shamir field: a Mersenne prime, larger than any 256-bit secret
PRIME = 2**521 - 1
SECRET_BYTES = 32
SHARE_BYTES = 66  # ceil(521 / 8)
KEY_BYTES = 32
NONCE_BYTES = 12
PUBLIC_BYTES = 2 * KEY_BYTES
CIPHERTEXT_BYTES = NONCE_BYTES + 2 * SHARE_BYTES + 16  # + the GCM tag
DOMAIN = b"pollinate-secagg-v1"
MAX_ID = 2**63 - 1


class SecAggError(PrivacyError):
    """A secure aggregation message or call is invalid, or the sum cannot be unmasked."""


# --- configuration ----------------------------------------------------------------------


def _as_int(value: object) -> int | None:
    """``value`` as an int if it is an integer (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return operator.index(value)


def _as_float(value: object) -> float | None:
    """``value`` as a float if it is a real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _count_or_fraction(name: str, value: object, least: int, of: str) -> None:
    """Check that ``value`` is a whole count >= ``least`` or a fraction in (0, 1]."""
    hint = (
        f"secagg {name} must be a whole count >= {least} (an int, e.g. {least + 2}) or a "
        f"fraction in (0, 1] of {of} (a float, e.g. 0.5); got {value!r}"
    )
    count, v = _as_int(value), _as_float(value)
    if count is not None:
        if count < least:
            raise ConfigError(hint)
        return
    if v is None or not math.isfinite(v) or v <= 0 or (v > 1 and (not v.is_integer() or v < least)):
        raise ConfigError(hint)


def _resolve(value: float, total: int) -> int:
    """A count stays a count (at most ``total``); a fraction becomes ceil(fraction · total)."""
    if _as_int(value) is not None or value > 1:
        return min(int(value), total)
    return math.ceil(round(float(value) * total, 9))


@dataclass(frozen=True)
class SecAggConfig:
    """SecAgg+ parameters: the neighbourhood, the Shamir threshold and the integer encoding.

    Bell et al. 2020 (ePrint 2020/704): each client masks with and shares its secrets among
    k neighbours; any t of them can recover a secret. Keep t > k/2 (the default 0.6 of the
    neighbours) so that no server can gather t shares of both secrets of one client.
    ``neighbours`` and ``threshold`` are an int (a count) or a float in (0, 1] (a fraction):
    ``threshold=1`` is one neighbour, ``threshold=1.0`` all of them. A whole float above 1
    (``10.0``, as a config file may give it) is a count too.
    """

    neighbours: float = 0.5  # k: count >= 2, or fraction of the other clients
    threshold: float = 0.6  # t: count >= 1, or fraction of the neighbours
    clip_range: float = 8.0  # each coordinate is clipped to [-clip_range, clip_range]
    quantization_bits: int = 22  # ... and mapped to an integer in [0, 2^bits − 1]
    modulus_bits: int = 32  # masked sums live in Z_{2^modulus_bits}

    def __post_init__(self) -> None:
        _count_or_fraction("neighbours", self.neighbours, 2, "the other clients")
        _count_or_fraction("threshold", self.threshold, 1, "the neighbours")
        c = self.clip_range
        if not ((v := _as_float(c)) is not None and math.isfinite(v) and v > 0):
            raise ConfigError(
                f"secagg clip_range must be a finite number > 0 (the largest |coordinate| "
                f"encoded; larger ones are clipped), got {c!r}"
            )
        m = self.modulus_bits
        if _as_int(m) is None or not 2 <= m <= 64:
            raise ConfigError(
                f"secagg modulus_bits must be an int in [2, 64] (vectors are uint64), got {m!r}"
            )
        q = self.quantization_bits
        if _as_int(q) is None or not 1 <= q <= 53:
            raise ConfigError(
                f"secagg quantization_bits must be an int in [1, 53] (float64 has 53 bits of "
                f"precision), got {q!r}"
            )
        if q >= m:
            raise ConfigError(
                f"secagg quantization_bits ({q}) must be below modulus_bits ({m}) so that the "
                "sum of two or more inputs fits: lower quantization_bits or raise modulus_bits"
            )

    def plan(self, num_clients: int) -> tuple[int, int]:
        """(k neighbours per client, t threshold) for ``num_clients`` sampled clients.

        k: the count (at most n − 1) or ceil(fraction · (n − 1)); at least 2 when n >= 3 so
        the graph is connected; and, since no graph on n vertices has all degrees equal to an
        odd k when n is odd, an odd k is rounded up to k + 1 when n is odd (k + 1 <= n − 1
        then). t: the count (at most k) or ceil(fraction · k), at least 1.
        """
        n = int(num_clients)
        if n < 2:
            raise SecAggError(
                f"secure aggregation needs at least 2 clients in a round, got {n}: a sum over "
                "one client is its input; sample more clients per round"
            )
        k = max(_resolve(self.neighbours, n - 1), min(2, n - 1))
        if k % 2 == 1 and n % 2 == 1:
            k += 1
        t = max(1, _resolve(self.threshold, k))
        return k, t

    def max_clients(self) -> int:
        """The most clients whose quantized inputs sum below ``2^modulus_bits``."""
        return int((2**self.modulus_bits - 1) // (2**self.quantization_bits - 1))

    def check(self, num_clients: int) -> None:
        """ConfigError unless the sum of ``num_clients`` quantized inputs fits the modulus."""
        levels = 2**self.quantization_bits - 1
        if num_clients * levels >= 2**self.modulus_bits:
            raise ConfigError(
                f"secagg: the sum of {num_clients} inputs of {self.quantization_bits} bits could "
                f"wrap around the modulus 2^{self.modulus_bits}; lower quantization_bits, raise "
                f"modulus_bits, or sample at most {self.max_clients()} clients per round"
            )

    def quantum(self) -> float:
        """The quantization step ``2·clip_range / (2^bits − 1)`` (error <= quantum/2 each)."""
        return float(2 * self.clip_range / (2**self.quantization_bits - 1))


# --- pure pieces: graph, quantization, PRG, Shamir ----------------------------------------


def _check_ids(client_ids: Sequence[int], what: str) -> list[int]:
    ids = [_check_id(cid, f"{what}: a client id") for cid in client_ids]
    if len(set(ids)) != len(ids):
        raise SecAggError(f"{what}: client ids must be distinct, got {sorted(ids)}")
    return ids


def neighbour_graph(
    client_ids: Sequence[int], k: int, rng: np.random.Generator
) -> dict[int, list[int]]:
    """The Harary graph H(k, n) on the clients after a random relabelling: id -> neighbours.

    Client at ring position p is joined to positions p ± 1, …, p ± ⌊k/2⌋, and for odd k (n
    even) to p + n/2. Symmetric, every degree exactly k; k = n − 1 is the complete graph.
    """
    ids = _check_ids(client_ids, "neighbour_graph")
    n = len(ids)
    if _as_int(k) is None or not 1 <= k <= n - 1:
        raise SecAggError(f"neighbour_graph: k must be in [1, n − 1 = {n - 1}], got {k!r}")
    if k % 2 == 1 and n % 2 == 1:
        raise SecAggError(
            f"neighbour_graph: no graph on {n} vertices has every degree equal to {k} (k·n "
            f"is odd); use k = {k + 1} (SecAggConfig.plan rounds it up)"
        )
    ring = [ids[int(i)] for i in rng.permutation(n)]
    steps = list(range(1, k // 2 + 1)) + ([n // 2] if k % 2 else [])
    graph: dict[int, set[int]] = {cid: set() for cid in ids}
    for p, cid in enumerate(ring):
        for d in steps:
            other = ring[(p + d) % n]
            graph[cid].add(other)
            graph[other].add(cid)
    return {cid: sorted(peers) for cid, peers in graph.items()}


def quantize(x: NDArray[Any], clip_range: float, bits: int) -> NDArray[np.uint64]:
    """Clip to ``[-clip_range, clip_range]`` and map to integers in ``[0, 2^bits − 1]``.

    ``round((clip(x) + c) · (2^bits − 1) / 2c)``, rounding half to even.
    """
    x = np.asarray(x, dtype=np.float64)
    bad = int(np.count_nonzero(~np.isfinite(x)))
    if bad:
        raise SecAggError(f"cannot quantize {bad} non-finite values (nan or inf); fix the input")
    levels = 2**bits - 1
    scaled = np.clip(x, -clip_range, clip_range)
    scaled += clip_range
    scaled *= levels / (2 * clip_range)
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, levels, out=scaled)
    out: NDArray[np.uint64] = scaled.astype(np.uint64)
    return out


def dequantize(
    total: NDArray[np.uint64], count: int, clip_range: float, bits: int
) -> NDArray[np.float64]:
    """The real sum of ``count`` quantized inputs: ``S · 2c / (2^bits − 1) − count · c``."""
    out = np.asarray(total).astype(np.float64)
    out *= 2 * clip_range / (2**bits - 1)
    out -= count * clip_range
    return out


def prg(seed: bytes, length: int) -> NDArray[np.uint64]:
    """``length`` pseudorandom uint64 words: the ChaCha20 keystream under the 32-byte ``seed``.

    Callers add and subtract these mod 2^64 and reduce mod 2^m once at the end (2^m divides
    2^64, so the low m bits are the same as reducing every step).
    """
    encryptor = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    words: NDArray[np.uint64] = np.empty(length, dtype="<u8")
    out = words.view(np.uint8)
    zeros = bytes(min(out.size, _PRG_CHUNK))  # the keystream in cache-sized pieces, written
    for start in range(0, out.size, _PRG_CHUNK):  # straight into the result (no 8-byte-per-
        n = min(_PRG_CHUNK, out.size - start)  # word temporaries)
        out[start : start + n] = np.frombuffer(encryptor.update(zeros[:n]), np.uint8)
    return words.astype(np.uint64, copy=False)


_PRG_CHUNK = 1 << 20


def shamir_split(secret: int, threshold: int, xs: Sequence[int]) -> dict[int, int]:
    """Shares ``x -> f(x)`` of ``secret = f(0)``, ``f`` random of degree ``threshold − 1``."""
    if not 0 <= secret < PRIME:
        raise SecAggError("shamir_split: the secret must be in [0, 2^521 − 1)")
    if not 1 <= threshold <= len(xs):
        raise SecAggError(f"shamir_split: threshold {threshold} must be in [1, {len(xs)}]")
    if len(set(xs)) != len(xs) or not all(0 < x < PRIME for x in xs):
        raise SecAggError("shamir_split: the points must be distinct and nonzero")
    coefficients = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for a in reversed(coefficients):
            y = (y * x + a) % PRIME
        shares[x] = y
    return shares


def shamir_reconstruct(shares: Mapping[int, int]) -> int:
    """``f(0)`` by Lagrange interpolation through all the given points ``x -> f(x)``.

    With at least ``threshold`` shares this is the secret; with fewer it is a value unrelated
    to it (uniformly random over the field, for random coefficients).
    """
    points = list(shares.items())
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    return secret


# --- wire formats and key derivation ------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object, length: int, what: str) -> bytes:
    """Decode an ASCII base64 message of exactly ``length`` bytes, or SecAggError(``what``)."""
    if not isinstance(text, str):
        raise SecAggError(f"{what}: expected a base64 str, got {type(text).__name__}")
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError) as e:
        raise SecAggError(f"{what}: not valid base64 ({e})") from None
    if len(data) != length:
        raise SecAggError(f"{what}: {len(data)} bytes, expected {length}")
    return data


def _context(purpose: bytes, tag: bytes, *ids: int) -> bytes:
    """Length-prefixed ``DOMAIN · purpose · tag · ids``: HKDF info and GCM associated data."""
    parts = [DOMAIN, purpose, tag, *(i.to_bytes(8, "big") for i in ids)]
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def _agree(private: bytes, public: bytes, info: bytes, who: str) -> bytes:
    """HKDF-SHA256(X25519(private, public), info): a 32-byte key shared by both ends."""
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(public)
        )
    except ValueError as e:
        raise SecAggError(f"key agreement with {who} failed ({e}): its public key is bad") from None
    return HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=info).derive(shared)


def _mask_seed(s_sk: bytes, s_pk: bytes, tag: bytes, u: int, v: int, who: str) -> bytes:
    """``s_uv = s_vu``: the pairwise mask seed of clients u and v."""
    return _agree(s_sk, s_pk, _context(b"pairwise mask", tag, min(u, v), max(u, v)), who)


def _parse_public(text: object, cid: int) -> tuple[bytes, bytes]:
    """(c_pk, s_pk) from a client's public message."""
    raw = _unb64(text, PUBLIC_BYTES, f"the public keys of client {cid}")
    return raw[:KEY_BYTES], raw[KEY_BYTES:]


def _parse_share(text: object, what: str) -> int:
    value = int.from_bytes(_unb64(text, SHARE_BYTES, what), "big")
    if value >= PRIME:
        raise SecAggError(f"{what}: not in the Shamir field")
    return value


def _point(cid: int) -> int:
    """The Shamir x-coordinate of the share held by client ``cid``."""
    return cid + 1


def _check_tag(tag: object) -> bytes:
    if not isinstance(tag, bytes):
        raise SecAggError(f"the round tag must be bytes, got {type(tag).__name__}")
    return tag


def _check_id(cid: object, what: str) -> int:
    value = _as_int(cid)
    if value is None or not 0 <= value <= MAX_ID:
        raise SecAggError(f"{what} must be a client id (an int in [0, 2^63)), got {cid!r}")
    return value


# --- the client's side --------------------------------------------------------------------

_CLIENT_STAGES = {
    "keys": "client_shares",
    "shares": "client_mask",
    "masked": "client_unmask",
    "done": "nothing (the round is over)",
}


def _client_stage(state: Mapping[str, Any], stage: str, call: str, me: int) -> None:
    got = state.get("stage")
    if got == stage:
        if stage != "keys" and state.get("me") != me:
            raise SecAggError(f"{call}: this state belongs to client {state.get('me')}, not {me}")
        return
    if call == "client_unmask" and got == "done":
        raise SecAggError(
            f"client {me}: asked to unmask twice in one round; refused (two answers could "
            "reveal both secrets of a client)"
        )
    nxt = _CLIENT_STAGES.get(str(got), "client_keys (this is not a secagg client state)")
    raise SecAggError(f"{call} is out of order for client {me}: the next call is {nxt}")


def client_keys(tag: bytes) -> tuple[dict[str, Any], str]:
    """Stage 1: fresh key pairs and self-mask seed; (state to keep, public message to send)."""
    c_sk, s_sk = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    state: dict[str, Any] = {
        "stage": "keys",
        "tag": _check_tag(tag),
        "c_sk": c_sk.private_bytes_raw(),
        "s_sk": s_sk.private_bytes_raw(),
        "seed": os.urandom(SECRET_BYTES),
    }
    public = c_sk.public_key().public_bytes_raw() + s_sk.public_key().public_bytes_raw()
    return state, _b64(public)


def client_shares(
    state: dict[str, Any], me: int, neighbours: Mapping[int, str], threshold: int
) -> dict[int, str]:
    """Stage 2: Shamir-share ``b_u`` and ``s_sk_u`` among ``neighbours``, one ciphertext each.

    ``neighbours``: id -> public message of each neighbour that completed stage 1. Returns
    receiver id -> ciphertext. Refuses when fewer than ``threshold`` neighbours are left.
    """
    me = _check_id(me, "me")
    _client_stage(state, "keys", "client_shares", me)
    peers = {_check_id(v, f"client {me}: a neighbour"): text for v, text in neighbours.items()}
    if me in peers:
        raise SecAggError(f"client {me} is listed as its own neighbour")
    if _as_int(threshold) is None or threshold < 1:
        raise SecAggError(f"client {me}: the threshold must be an int >= 1, got {threshold!r}")
    if len(peers) < threshold:
        raise SecAggError(
            f"client {me}: only {len(peers)} of its neighbours sent keys, fewer than the "
            f"threshold {threshold}: its secrets could never be recovered, so it stops here"
        )
    keys = {v: _parse_public(text, v) for v, text in peers.items()}
    tag: bytes = state["tag"]
    xs = {v: _point(v) for v in peers}
    seed_shares = shamir_split(int.from_bytes(state["seed"], "big"), threshold, list(xs.values()))
    key_shares = shamir_split(int.from_bytes(state["s_sk"], "big"), threshold, list(xs.values()))
    out = {}
    for v, (c_pk, _) in keys.items():
        key = _agree(state["c_sk"], c_pk, _context(b"share key", tag), f"client {v}")
        plain = seed_shares[xs[v]].to_bytes(SHARE_BYTES, "big")
        plain += key_shares[xs[v]].to_bytes(SHARE_BYTES, "big")
        nonce = os.urandom(NONCE_BYTES)
        sealed = AESGCM(key).encrypt(nonce, plain, _context(b"shares", tag, me, v))
        out[v] = _b64(nonce + sealed)
    state.update(stage="shares", me=me, threshold=int(threshold), peers=dict(peers))
    return out


def _open_shares(state: Mapping[str, Any], me: int, sender: int, text: object) -> list[int]:
    """Decrypt the ciphertext ``sender`` addressed to ``me``: [share of b, share of s_sk]."""
    tag: bytes = state["tag"]
    raw = _unb64(text, CIPHERTEXT_BYTES, f"client {me}: the shares from client {sender}")
    c_pk, _ = _parse_public(state["peers"][sender], sender)
    key = _agree(state["c_sk"], c_pk, _context(b"share key", tag), f"client {sender}")
    try:
        plain = AESGCM(key).decrypt(
            raw[:NONCE_BYTES], raw[NONCE_BYTES:], _context(b"shares", tag, sender, me)
        )
    except InvalidTag:
        raise SecAggError(
            f"client {me}: the shares from client {sender} do not decrypt: forged, tampered "
            "with, or meant for another client or round"
        ) from None
    shares = [
        int.from_bytes(plain[:SHARE_BYTES], "big"),
        int.from_bytes(plain[SHARE_BYTES:], "big"),
    ]
    if max(shares) >= PRIME:
        raise SecAggError(f"client {me}: the shares from client {sender} are not field elements")
    return shares


def client_mask(
    state: dict[str, Any],
    me: int,
    received: Mapping[int, str],
    x: NDArray[Any],
    config: SecAggConfig,
) -> NDArray[np.uint64]:
    """Stage 3: decrypt the shares addressed to ``me`` and return the masked ``x`` (uint64).

    Pairwise masks go to exactly the senders in ``received``. The client's private keys and
    seed are dropped from ``state`` afterwards; only the shares it holds are kept.
    """
    me = _check_id(me, "me")
    _client_stage(state, "shares", "client_mask", me)
    senders = sorted(_check_id(w, f"client {me}: a sender") for w in received)
    strangers = [w for w in senders if w not in state["peers"]]
    if strangers:
        raise SecAggError(
            f"client {me}: received shares from {strangers}, which are not among its "
            f"neighbours {sorted(state['peers'])}"
        )
    if len(senders) < state["threshold"]:
        raise SecAggError(
            f"client {me}: only {len(senders)} neighbours shared their secrets, fewer than the "
            f"threshold {state['threshold']}: too few pairwise masks to hide its input; it "
            "stops here"
        )
    x = np.asarray(x)
    if x.ndim != 1 or x.dtype.kind not in "fiu":
        raise SecAggError(f"client {me}: x must be a 1-D real vector, got {x.dtype} {x.shape}")
    held = {w: _open_shares(state, me, w, received[w]) for w in senders}

    y = quantize(x, config.clip_range, config.quantization_bits)
    y += prg(state["seed"], len(y))
    tag: bytes = state["tag"]
    for w in senders:
        _, s_pk = _parse_public(state["peers"][w], w)
        stream = prg(_mask_seed(state["s_sk"], s_pk, tag, me, w, f"client {w}"), len(y))
        if me < w:
            y += stream
        else:
            y -= stream
    if config.modulus_bits < 64:
        y &= np.uint64(2**config.modulus_bits - 1)
    for secret in ("c_sk", "s_sk", "seed"):
        del state[secret]
    state.update(stage="masked", held=held)
    return y


def client_unmask(
    state: dict[str, Any], me: int, survivors: Collection[int], dropped: Collection[int]
) -> dict[int, str]:
    """Stage 4: sender id -> revealed share: of ``b_w`` for survivors, of ``s_sk_w`` for dropped.

    Refuses (SecAggError) when the lists intersect, when ``me`` is not a survivor, when a
    neighbour whose shares it never received is listed, or on a second call. Clients that
    are not its neighbours are ignored.
    """
    me = _check_id(me, "me")
    _client_stage(state, "masked", "client_unmask", me)
    alive = {_check_id(w, f"client {me}: a survivor") for w in survivors}
    gone = {_check_id(w, f"client {me}: a dropped client") for w in dropped}
    both = alive & gone
    if both:
        raise SecAggError(
            f"client {me}: clients {sorted(both)} are listed both as survivors and as dropped; "
            "refused: answering would reveal both secrets of each, and so their inputs"
        )
    if me not in alive:
        raise SecAggError(
            f"client {me} sent its masked input but is not listed as a survivor; refused"
        )
    held: dict[int, list[int]] = state["held"]
    unknown = sorted(w for w in state["peers"] if w in alive | gone and w not in held)
    if unknown:
        raise SecAggError(
            f"client {me}: asked about neighbours {unknown}, whose shares it never received "
            "(the server's lists disagree with what it delivered); refused"
        )
    out = {}
    for w, (seed_share, key_share) in held.items():
        if w in alive:
            out[w] = _b64(seed_share.to_bytes(SHARE_BYTES, "big"))
        elif w in gone:
            out[w] = _b64(key_share.to_bytes(SHARE_BYTES, "big"))
    del state["held"]
    state["stage"] = "done"
    return out


# --- the server's side --------------------------------------------------------------------

_SERVER_STAGES = {
    "keys": "1 (collecting public keys)",
    "shares": "2 (collecting encrypted shares)",
    "masked": "3 (collecting masked inputs)",
    "unmask": "4 (collecting revealed shares)",
    "failed": "4 (failed: too few survivors)",
    "done": "done (the result was taken)",
}


class SecAggServer:
    """The server's side of one SecAgg+ round: routes messages, sums, unmasks the sum.

    Holds the running sum of the masked inputs (O(model) memory; no single input is kept),
    the public keys, the ciphertexts in transit and the revealed shares. ``length`` fixes
    the vector length up front; otherwise the first masked input sets it.
    """

    def __init__(
        self,
        config: SecAggConfig,
        client_ids: Sequence[int],
        tag: bytes,
        rng: np.random.Generator,
        *,
        length: int | None = None,
    ) -> None:
        ids = _check_ids(client_ids, "SecAggServer")
        config.check(len(ids))
        self.config = config
        self.tag = _check_tag(tag)
        self.k, self.t = config.plan(len(ids))
        self.graph = neighbour_graph(ids, self.k, rng)
        self.survivors: list[int] = []
        self.dropped: list[int] = []
        self._stage = "keys"
        self._public: dict[int, str] = {}  # U1: id -> public message
        self._inbox: dict[int, dict[int, str]] = {}  # receiver -> sender -> ciphertext
        self._shared: set[int] = set()  # U2
        self._length = length
        self._total: NDArray[np.uint64] | None = None
        self._reveals: dict[int, dict[int, int]] = {}  # w -> Shamir x -> revealed share
        self._answered: set[int] = set()
        self._failure = ""
        self._result: NDArray[np.float64] | None = None

    def _enter(self, stage: str, call: str, opens_from: str | None = None) -> None:
        """Check that ``call`` belongs to ``stage``, first closing ``opens_from`` if open."""
        if opens_from is not None and self._stage == opens_from:
            self._stage = stage
        if self._stage != stage:
            if self._failure:
                raise SecAggError(self._failure)
            raise SecAggError(
                f"{call} is out of order: the server is at stage {_SERVER_STAGES[self._stage]}, "
                f"{call} belongs to stage {_SERVER_STAGES[stage]}"
            )

    def _known(self, cid: object, call: str) -> int:
        value = _as_int(cid)
        if value is None or value not in self.graph:
            raise SecAggError(f"{call}: client {cid!r} was not sampled for this round")
        return value

    # stage 1 ------------------------------------------------------------------------------

    def add_keys(self, cid: int, public: str) -> None:
        """Record a client's public keys (once)."""
        self._enter("keys", "add_keys")
        cid = self._known(cid, "add_keys")
        if cid in self._public:
            raise SecAggError(f"client {cid} sent its public keys twice")
        _parse_public(public, cid)
        self._public[cid] = public

    # stage 2 ------------------------------------------------------------------------------

    def _peers(self, cid: int) -> list[int]:
        """cid's neighbours that completed stage 1."""
        return [v for v in self.graph[cid] if v in self._public]

    def neighbours_public(self, cid: int) -> dict[int, str]:
        """The public messages of cid's neighbours that sent keys (closes stage 1)."""
        self._enter("shares", "neighbours_public", opens_from="keys")
        cid = self._known(cid, "neighbours_public")
        if cid not in self._public:
            raise SecAggError(f"client {cid} did not send its public keys in stage 1")
        return {v: self._public[v] for v in self._peers(cid)}

    def add_shares(self, cid: int, ciphertexts: Mapping[int, str]) -> None:
        """Record cid's encrypted shares, one for each neighbour that sent keys (once)."""
        self._enter("shares", "add_shares")
        cid = self._known(cid, "add_shares")
        if cid not in self._public:
            raise SecAggError(f"client {cid} did not send its public keys in stage 1")
        if cid in self._shared:
            raise SecAggError(f"client {cid} sent its shares twice")
        expected = set(self._peers(cid))
        if set(ciphertexts) != expected:
            raise SecAggError(
                f"client {cid} sent shares for {sorted(ciphertexts)}, expected exactly its "
                f"neighbours that sent keys {sorted(expected)}"
            )
        for v, text in ciphertexts.items():
            _unb64(text, CIPHERTEXT_BYTES, f"the shares client {cid} sent to client {v}")
        for v, text in ciphertexts.items():
            self._inbox.setdefault(v, {})[cid] = text
        self._shared.add(cid)

    # stage 3 ------------------------------------------------------------------------------

    def shares_for(self, cid: int) -> dict[int, str]:
        """The ciphertexts addressed to cid by clients that completed stage 2 (closes it)."""
        self._enter("masked", "shares_for", opens_from="shares")
        cid = self._known(cid, "shares_for")
        if cid not in self._shared:
            raise SecAggError(f"client {cid} did not send its shares in stage 2")
        return dict(self._inbox.get(cid, {}))

    def add_masked(self, cid: int, masked: NDArray[np.uint64]) -> None:
        """Fold cid's masked input into the running sum (once; only clients in stage 2)."""
        self._enter("masked", "add_masked")
        cid = self._known(cid, "add_masked")
        if cid not in self._shared:
            raise SecAggError(
                f"client {cid} did not send its shares in stage 2, so its masked input could "
                "never be unmasked; refused"
            )
        if cid in self.survivors:
            raise SecAggError(f"client {cid} sent its masked input twice")
        if not isinstance(masked, np.ndarray) or masked.dtype != np.uint64:
            got = masked.dtype if isinstance(masked, np.ndarray) else type(masked).__name__
            raise SecAggError(f"the masked input of client {cid} must be a uint64 array, got {got}")
        length = self._length if self._length is not None else len(masked)
        if masked.ndim != 1 or masked.shape[0] != length:
            raise SecAggError(
                f"the masked input of client {cid} has shape {masked.shape}, expected ({length},)"
            )
        m = self.config.modulus_bits
        if m < 64 and masked.size and int(masked.max()) >> m:
            raise SecAggError(
                f"the masked input of client {cid} has values >= 2^{m}: it is not reduced "
                "modulo the configured modulus (does the client use the same SecAggConfig?)"
            )
        if self._total is None:
            self._length = length
            self._total = np.zeros(length, np.uint64)
        self._total += masked
        self.survivors.append(cid)

    # stage 4 ------------------------------------------------------------------------------

    def unmask_request(self) -> tuple[list[int], list[int]]:
        """(survivors U3, dropped U2 \\ U3), both sorted: what every survivor is asked."""
        if self._stage == "unmask":
            return list(self.survivors), list(self.dropped)
        self._enter("masked", "unmask_request", opens_from="shares")
        self.survivors.sort()
        self.dropped = sorted(self._shared - set(self.survivors))
        if len(self.survivors) < self.t:
            self._stage = "failed"
            self._failure = (
                f"only {len(self.survivors)} clients sent masked inputs, fewer than the "
                f"threshold t = {self.t} ({len(self.dropped)} dropped after sharing): the sum "
                "would reveal too little aggregation; the round cannot be unmasked"
            )
            raise SecAggError(self._failure)
        self._stage = "unmask"
        return list(self.survivors), list(self.dropped)

    def add_reveal(self, cid: int, shares: Mapping[int, str]) -> None:
        """Record a survivor's revealed shares, one for every client whose shares it got."""
        self._enter("unmask", "add_reveal")
        cid = self._known(cid, "add_reveal")
        if cid not in self.survivors:
            raise SecAggError(f"client {cid} is not a survivor; it is not asked to unmask")
        if cid in self._answered:
            raise SecAggError(f"client {cid} revealed its shares twice")
        expected = set(self._inbox.get(cid, {}))
        if set(shares) != expected:
            raise SecAggError(
                f"client {cid} revealed shares of {sorted(shares)}, expected exactly the clients "
                f"whose shares it received {sorted(expected)}"
            )
        values = {
            w: _parse_share(text, f"client {cid}'s share of client {w}")
            for w, text in shares.items()
        }
        for w, value in values.items():
            self._reveals.setdefault(w, {})[_point(cid)] = value
        self._answered.add(cid)

    def _recover(self, w: int) -> int:
        """Reconstruct client w's secret from t revealed shares (cross-checked if more)."""
        points = sorted(self._reveals.get(w, {}).items())
        secret = shamir_reconstruct(dict(points[: self.t]))
        if len(points) > self.t and shamir_reconstruct(dict(points[-self.t :])) != secret:
            raise SecAggError(
                f"the shares revealed for client {w} disagree: one of the clients "
                f"{sorted(x - 1 for x, _ in points)} revealed a wrong share"
            )
        if secret >= 2 ** (8 * SECRET_BYTES):
            raise SecAggError(f"the shares revealed for client {w} are inconsistent")
        return secret

    def _missing(self) -> str:
        """Why some secret cannot be reconstructed ('' when all can)."""
        short = []
        for w in sorted(self._shared):
            held = len(self._reveals.get(w, {}))
            if held < self.t:
                what = "survivor, self-mask seed" if w in self.survivors else "dropped, mask key"
                short.append(f"client {w} ({what}): {held} of the {self.t} shares needed")
        if not short:
            return ""
        silent = len(self.survivors) - len(self._answered)
        listed = "; ".join(short[:10]) + ("; …" if len(short) > 10 else "")
        return (
            f"cannot unmask the sum: {len(self.dropped)} of {len(self._shared)} clients dropped "
            f"after sharing their secrets and {silent} of {len(self.survivors)} survivors did "
            f"not reveal; {len(short)} secrets have too few shares among the neighbours that "
            f"answered: {listed}. Lower the threshold, use more neighbours, or lose fewer clients"
        )

    def result(self) -> NDArray[np.float64]:
        """The float64 sum of the survivors' (clipped, quantized) inputs."""
        if self._result is not None:
            return self._result.copy()
        self._enter("unmask", "result")
        why = self._missing()
        if why:
            raise SecAggError(why)
        seeds = {w: self._recover(w) for w in self.survivors}
        keys = {w: self._recover(w) for w in self.dropped}
        for w, secret in keys.items():
            s_sk = secret.to_bytes(SECRET_BYTES, "big")
            pk = X25519PrivateKey.from_private_bytes(s_sk).public_key().public_bytes_raw()
            if pk != _parse_public(self._public[w], w)[1]:
                raise SecAggError(
                    f"the shares revealed for dropped client {w} do not give its mask key: a "
                    "neighbour revealed a wrong share"
                )
        assert self._total is not None  # at least t >= 1 survivors
        total = self._total
        n = len(total)
        for secret in seeds.values():
            total -= prg(secret.to_bytes(SECRET_BYTES, "big"), n)
        for w, secret in keys.items():
            s_sk = secret.to_bytes(SECRET_BYTES, "big")
            for v in self.survivors:
                if w not in self._inbox.get(v, {}):
                    continue  # v did not get w's shares, so it did not mask with w
                _, s_pk = _parse_public(self._public[v], v)
                stream = prg(_mask_seed(s_sk, s_pk, self.tag, v, w, f"client {v}"), n)
                if v < w:
                    total -= stream  # v added +PRG(s_vw)
                else:
                    total += stream
        if self.config.modulus_bits < 64:
            total &= np.uint64(2**self.config.modulus_bits - 1)
        cfg = self.config
        self._result = dequantize(total, len(self.survivors), cfg.clip_range, cfg.quantization_bits)
        self._total = None
        self._stage = "done"
        return self._result.copy()
