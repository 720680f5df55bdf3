"""Client authentication: Ed25519 request signatures, an allow-list of public keys, no replays.

A client signs every request that matters (registration, each result) with its Ed25519 key over
a canonical byte string. Every field is length-prefixed (u32, big-endian), so two different
requests never sign the same bytes::

    b"pollinate-v1" · kind (UTF-8) · client id (decimal ASCII) · timestamp (IEEE-754 f64,
    big-endian) · nonce (16 random bytes) · digest of the request's payload (e.g. SHA-256)

The server's :class:`Verifier` accepts a request only when

1. the client id is on the allow-list: a text file the server re-reads when it changes, so
   deleting a client's line revokes it without a restart;
2. the signature verifies under the public key listed for that client id;
3. the timestamp is within ``max_skew_s`` (300 s) of the server's clock; and
4. the nonce has not been seen before. A nonce is remembered until ``timestamp + max_skew_s``;
   after that the timestamp check alone refuses a replay, so the store stays small.

Nonces are recorded only for requests whose signature and timestamp are valid, so nobody can
fill the store without a listed key. Refusals raise :class:`AuthError` with a reason that can be
shown to the client as is: it names the client id and the fix.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import logging
import math
import operator
import os
import re
import secrets
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from pollinate.errors import ConfigError, PollinateError, missing_dependency

try:
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )
except ImportError as e:  # pragma: no cover - depends on the environment
    raise missing_dependency("cryptography", "deploy") from e

__all__ = [
    "DEFAULT_MAX_SKEW_S",
    "AllowList",
    "AuthError",
    "NonceCache",
    "Signature",
    "Verifier",
    "canonical_bytes",
    "load_private_key",
    "load_public_key_b64",
    "parse_allow_list",
    "public_key_b64",
    "sign",
]

log = logging.getLogger("pollinate")

PREFIX = b"pollinate-v1"
NONCE_BYTES = 16
SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32
DEFAULT_MAX_SKEW_S = 300.0
_CLIENT_ID = re.compile(r"[0-9]{1,19}")
_B64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")


class AuthError(PollinateError):
    """A request failed authentication; the message says why and how to fix it."""


# ---------------------------------------------------------------------------------------- keys


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Read an unencrypted Ed25519 private key from a PEM file (as written by `pollinate keys`)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(
            f"cannot read the client key {p}: {e.strerror}; create one with `pollinate keys`"
        ) from e
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise ConfigError(
            f"{p} is not an unencrypted PEM private key ({e}); create one with `pollinate keys`"
        ) from e
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(
            f"{p} holds a {type(key).__name__}, not an Ed25519 key; "
            "create one with `pollinate keys`"
        )
    return key


def load_public_key_b64(text: str) -> Ed25519PublicKey:
    """Decode a public key written as base64 of its 32 raw bytes (a ``client-<id>.pub`` file)."""
    raw = _decode_b64(text.strip())
    if raw is None or len(raw) != PUBLIC_KEY_BYTES:
        shown = text.strip()[:60]
        raise ConfigError(
            f"{shown!r} is not a public key: expected base64 of {PUBLIC_KEY_BYTES} raw bytes, "
            "the content of a client-<id>.pub file made by `pollinate keys`"
        )
    return Ed25519PublicKey.from_public_bytes(raw)


def public_key_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The base64 text of a key's raw public bytes: what goes on the server's allow-list."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def _decode_b64(text: str) -> bytes | None:
    if not _B64.fullmatch(text):
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# ------------------------------------------------------------------------------------- signing


@dataclass(frozen=True)
class Signature:
    """What a signed request carries: unix time in seconds, a random nonce, the Ed25519 bytes."""

    timestamp: float
    nonce: bytes
    signature: bytes


def _field(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def canonical_bytes(
    kind: str, client_id: int, timestamp: float, nonce: bytes, digest: bytes
) -> bytes:
    """The exact bytes a client signs for one request (see the module docstring)."""
    return b"".join(
        _field(part)
        for part in (
            PREFIX,
            kind.encode("utf-8"),
            str(operator.index(client_id)).encode("ascii"),
            struct.pack(">d", float(timestamp)),
            bytes(nonce),
            bytes(digest),
        )
    )


def sign(
    private_key: Ed25519PrivateKey,
    kind: str,
    client_id: int,
    digest: bytes,
    *,
    timestamp: float | None = None,
    nonce: bytes | None = None,
) -> Signature:
    """Sign one request of type ``kind`` whose payload hashes to ``digest``.

    ``timestamp`` defaults to now and ``nonce`` to 16 fresh random bytes; pass them only to
    reproduce a request (tests).
    """
    ts = time.time() if timestamp is None else float(timestamp)
    n = secrets.token_bytes(NONCE_BYTES) if nonce is None else bytes(nonce)
    if len(n) != NONCE_BYTES:
        raise ConfigError(f"a nonce must be {NONCE_BYTES} bytes, got {len(n)}")
    return Signature(ts, n, private_key.sign(canonical_bytes(kind, client_id, ts, n, digest)))


# ---------------------------------------------------------------------------------- allow-list


def parse_allow_list(text: str | bytes, source: str = "allow-list") -> dict[int, Ed25519PublicKey]:
    """Parse allow-list text: one ``<client_id> <base64 public key>`` per line, ``#`` comments.

    Raises ``ConfigError`` naming ``source`` and the line number of the first bad line.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{source} is not UTF-8 text (byte {e.start})") from e
    form = "'<client_id> <base64 public key>'"
    keys: dict[int, Ed25519PublicKey] = {}
    first_line: dict[int, int] = {}
    for lineno, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        where = f"{source}, line {lineno}"
        if len(fields) != 2:
            raise ConfigError(f"{where}: expected {form}, got {line[:80]!r}")
        id_text, key_text = fields
        if not _CLIENT_ID.fullmatch(id_text):
            raise ConfigError(
                f"{where}: client id {id_text[:40]!r} is not a non-negative integer; "
                f"each line is {form}"
            )
        client_id = int(id_text)
        raw = _decode_b64(key_text)
        if raw is None or len(raw) != PUBLIC_KEY_BYTES:
            raise ConfigError(
                f"{where}: the key of client {client_id} is not base64 of a "
                f"{PUBLIC_KEY_BYTES}-byte Ed25519 public key; paste the content of "
                f"client-{client_id}.pub made by `pollinate keys`"
            )
        if client_id in keys:
            if _raw(keys[client_id]) != raw:
                raise ConfigError(
                    f"{where}: client {client_id} is listed again with a different key "
                    f"(first on line {first_line[client_id]}); keep one line per client"
                )
            continue
        keys[client_id] = Ed25519PublicKey.from_public_bytes(raw)
        first_line[client_id] = lineno
    return keys


class AllowList:
    """Client ids and their Ed25519 public keys, read from a file and re-read when it changes.

    File format: one ``<client_id> <base64 raw public key>`` per line; ``#`` starts a comment;
    blank lines are ignored. Every lookup checks the file's identity, size and times (a cheap
    ``stat``) and re-reads it when they changed, so adding or deleting a line takes effect on
    the next request. A file changed (mtime or ctime) in the last 2 s is re-read on every
    lookup until it settles: a second edit within the file system's timestamp granularity
    could otherwise go unnoticed. If the file becomes unreadable or malformed, every client is
    refused until it is fixed (failing closed: a half-saved file must not re-admit anyone).
    """

    SETTLE_S = 2.0

    def __init__(self, keys: Mapping[int, Ed25519PublicKey], path: Path | None = None) -> None:
        self._keys: dict[int, Ed25519PublicKey] = dict(keys)
        self._path = path
        self._lock = threading.Lock()
        self._stat: tuple[int, ...] | None = None
        self._content: bytes | None = None
        self._error: str | None = None
        self._removed: set[int] = set()
        self.version = 0  # counts the changes of the entries (a watcher compares it)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AllowList:
        """Read the allow-list file at ``path``; ``ConfigError`` if it is missing or malformed."""
        allow_list = cls({}, Path(path))
        allow_list.refresh()
        return allow_list

    @classmethod
    def from_text(cls, text: str) -> AllowList:
        """An allow-list held in memory (never re-read), e.g. for tests and embedded servers."""
        return cls(parse_allow_list(text, source="<text>"))

    @property
    def path(self) -> Path | None:
        """The file this allow-list is read from (None when built in memory)."""
        return self._path

    def refresh(self) -> bool:
        """Re-read the file if it changed; return whether the entries changed.

        Raises ``ConfigError`` (naming the file and line) if the file cannot be read or parsed;
        until it is fixed, :meth:`key_for` raises too.
        """
        if self._path is None:
            return False
        with self._lock:
            try:
                st = os.stat(self._path)
                signature = (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                if signature == self._stat and self._error is None:
                    return False
                data = self._path.read_bytes()
            except OSError as e:
                self._fail(f"cannot read the allow-list file {self._path}: {e.strerror}")
            changed_at = max(st.st_mtime_ns, st.st_ctime_ns) / 1e9
            settled = time.time() - changed_at >= self.SETTLE_S
            self._stat = signature if settled else None
            if data == self._content and self._error is None:
                return False
            try:
                keys = parse_allow_list(data, source=str(self._path))
            except ConfigError as e:
                self._fail(str(e))
            changed = self._content is None or {k: _raw(v) for k, v in keys.items()} != {
                k: _raw(v) for k, v in self._keys.items()
            }
            self._removed = (self._removed | set(self._keys)) - set(keys)
            self._keys, self._content, self._error = keys, data, None
            if changed:
                self.version += 1
            return changed

    def _fail(self, message: str) -> NoReturn:
        self._stat, self._content, self._error = None, None, message
        raise ConfigError(f"{message}; every client is refused until the file is fixed")

    def key_for(self, client_id: int) -> Ed25519PublicKey | None:
        """The public key listed for ``client_id``, or None if it is not listed."""
        self.refresh()
        with self._lock:
            return self._keys.get(client_id)

    def was_removed(self, client_id: int) -> bool:
        """Whether ``client_id`` was listed in an earlier version of the file (revoked)."""
        with self._lock:
            return client_id in self._removed

    def listed(self) -> dict[int, str]:
        """Every listed client id and its public key (base64), re-reading the file if it
        changed; ``ConfigError`` while the file is unreadable or malformed."""
        self.refresh()
        with self._lock:
            if self._error is not None:
                raise ConfigError(f"{self._error}; every client is refused until it is fixed")
            return {cid: public_key_b64(key) for cid, key in self._keys.items()}

    def client_ids(self) -> list[int]:
        """The listed client ids, sorted."""
        self.refresh()
        with self._lock:
            return sorted(self._keys)

    def __len__(self) -> int:
        return len(self.client_ids())

    def __contains__(self, client_id: object) -> bool:
        return isinstance(client_id, int) and self.key_for(client_id) is not None


# ------------------------------------------------------------------------------------ verifying


class NonceCache:
    """The default nonce store: nonces in memory, each forgotten once its expiry time passes.

    Called as ``seen(nonce, expires_at)``: True if the nonce was seen before, otherwise records
    it and returns False. Expired entries are pruned on every call (a heap ordered by expiry).
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._expiry: dict[bytes, float] = {}
        self._heap: list[tuple[float, bytes]] = []
        self._lock = threading.Lock()

    def __call__(self, nonce: bytes, expires_at: float) -> bool:
        with self._lock:
            now = self._clock()
            while self._heap and self._heap[0][0] < now:  # still valid at == now
                expiry, old = heapq.heappop(self._heap)
                if self._expiry.get(old) == expiry:
                    del self._expiry[old]
            if nonce in self._expiry:
                return True
            self._expiry[nonce] = expires_at
            heapq.heappush(self._heap, (expires_at, nonce))
            return False

    def __len__(self) -> int:
        with self._lock:
            return len(self._expiry)


class Verifier:
    """Checks signed requests against an allow-list, the clock and the nonces seen so far.

    ``allow_list=None`` means an open server: nobody is identified and :meth:`verify` accepts
    every request (``authenticates`` is False, and the server should warn). ``seen_nonce`` is
    the nonce store (see :class:`NonceCache`, the in-memory default); pass the server state's
    ``seen_nonce`` to keep nonces across restarts. Thread-safe if the store is.
    """

    def __init__(
        self,
        allow_list: AllowList | None,
        seen_nonce: Callable[[bytes, float], bool] | None = None,
        max_skew_s: float = DEFAULT_MAX_SKEW_S,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not (isinstance(max_skew_s, (int, float)) and math.isfinite(max_skew_s)) or (
            max_skew_s <= 0
        ):
            raise ConfigError(f"max_skew_s must be a positive number of seconds, got {max_skew_s}")
        self.allow_list = allow_list
        self.max_skew_s = float(max_skew_s)
        self._clock = clock
        self._seen_nonce = seen_nonce if seen_nonce is not None else NonceCache(clock)

    @property
    def authenticates(self) -> bool:
        """Whether requests are checked at all (False without an allow-list)."""
        return self.allow_list is not None

    def verify(
        self,
        kind: str,
        client_id: int,
        digest: bytes,
        sig: Signature,
        *,
        public_key: str | None = None,
    ) -> None:
        """Accept the request or raise ``AuthError`` with a reason fit to send to the client.

        ``public_key`` (base64), if the request carries one (None or "" if not), must equal the
        listed key: a clearer reason than "bad signature" when a client uses the wrong key file.
        """
        if self.allow_list is None:
            return
        _check_form(client_id, sig)
        key = self._listed_key(client_id)
        if public_key and public_key.strip() != public_key_b64(key):
            raise AuthError(
                f"client {client_id} presented a public key that does not match its line on the "
                "server's allow-list: run the client with the key file whose .pub was listed, or "
                f"have the server operator replace client {client_id}'s line (`pollinate keys`)"
            )
        message = canonical_bytes(kind, client_id, sig.timestamp, sig.nonce, digest)
        try:
            key.verify(sig.signature, message)
        except InvalidSignature:
            raise AuthError(
                f"bad signature on a {kind} request from client {client_id}: the request was "
                "altered, or it was signed with a key other than the one on the server's "
                f"allow-list for client {client_id} (check the client's key file)"
            ) from None
        offset = self._clock() - sig.timestamp
        if abs(offset) > self.max_skew_s:
            side = "behind" if offset > 0 else "ahead of"
            raise AuthError(
                f"{kind} request from client {client_id} has a timestamp {abs(offset):.0f} s "
                f"{side} the server's clock (at most {self.max_skew_s:.0f} s allowed): either "
                "an old request was replayed or the client's clock is wrong (sync it with NTP)"
            )
        if self._seen_nonce(sig.nonce, sig.timestamp + self.max_skew_s):
            raise AuthError(
                f"replayed request (nonce seen before): a {kind} request from client "
                f"{client_id} was sent again; a client signs every request afresh"
            )

    def _listed_key(self, client_id: int) -> Ed25519PublicKey:
        assert self.allow_list is not None
        try:
            key = self.allow_list.key_for(client_id)
        except ConfigError as e:
            log.error("%s", e)
            raise AuthError(
                f"client {client_id} refused: the server's allow-list file is unreadable or "
                "malformed; the server operator must fix it (the server log names the line)"
            ) from None
        if key is not None:
            return key
        fix = (
            f"the server operator must add its public key (client-{client_id}.pub, made by "
            f"`pollinate keys`) to the allow-list file as the line '{client_id} <public key>'"
        )
        if self.allow_list.was_removed(client_id):
            raise AuthError(
                f"client {client_id} was removed from the server's allow-list (revoked); "
                f"to let it back in, {fix}"
            )
        raise AuthError(f"client {client_id} is not on the server's allow-list: {fix}")


def _check_form(client_id: object, sig: object) -> None:
    """Refuse requests whose fields cannot be a signed request before doing any crypto."""
    problem = None
    if not isinstance(client_id, int) or isinstance(client_id, bool) or client_id < 0:
        problem = f"client id {client_id!r} is not a non-negative integer"
    elif not isinstance(sig, Signature):
        problem = "no signature"
    elif not isinstance(sig.timestamp, (int, float)) or not math.isfinite(sig.timestamp):
        problem = f"timestamp {sig.timestamp!r} is not a finite number"
    elif not isinstance(sig.nonce, bytes) or len(sig.nonce) != NONCE_BYTES:
        problem = f"the nonce must be {NONCE_BYTES} bytes"
    elif not isinstance(sig.signature, bytes) or len(sig.signature) != SIGNATURE_BYTES:
        problem = f"the signature must be {SIGNATURE_BYTES} bytes"
    if problem is not None:
        raise AuthError(f"malformed signed request from client {client_id!r}: {problem}")
