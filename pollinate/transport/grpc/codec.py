"""What travels on the wire: Arrays as checksummed chunk streams, JSON scalars, signed digests.

A payload is ``pollinate.serde`` bytes cut into chunks (1 MiB by default), so a model of any
size that fits in memory goes through a stream of small gRPC messages: no 4 MB message limit,
no 2 GB protobuf ceiling. The header before the chunks declares the total size and the
SHA-256 of the bytes; the receiver's :class:`Assembler` checks every offset, the declared size
against its limit, and the checksum at the end. Anything else is a :class:`ProtocolError`,
which ends the peer's stream, except a checksum that does not match
(:class:`CorruptPayload`): bytes damaged in transit cost that one transfer, not the stream.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from pollinate import serde
from pollinate.errors import ConfigError, PollinateError, SerializationError, missing_dependency
from pollinate.transport.grpc.auth import Signature
from pollinate.types import Arrays, Scalar, check_scalars, to_python_scalars

try:
    from pollinate.transport.grpc import pollinate_pb2 as pb
except ImportError as e:  # pragma: no cover - depends on the environment
    raise missing_dependency("protobuf", "deploy") from e

PROTOCOL = 2  # 2: the server's chunks leave task_id empty (they belong to the last Task)
DEFAULT_CHUNK_BYTES = 1 << 20  # 1 MiB
DEFAULT_MAX_MESSAGE_BYTES = 4 << 20  # a gRPC message: one chunk plus its header
DEFAULT_MAX_PAYLOAD_BYTES = 4 << 30  # one task's or result's Arrays
MESSAGE_OVERHEAD = 16 << 10  # room for a chunk's task id, offset and framing
MAX_JSON_KEYS = 10_000


class ProtocolError(PollinateError, ValueError):
    """A peer sent a malformed or out-of-protocol message; its stream is closed."""


class CorruptPayload(ProtocolError):
    """A payload arrived whole but its bytes do not match the SHA-256 declared before them: a
    transmission error (or a faulty peer). The receiver refuses that payload; the stream, well
    framed, may carry on."""


def check_sizes(chunk_bytes: int, max_message_bytes: int, max_payload_bytes: int) -> None:
    """Raise ``ConfigError`` unless the transport's size limits fit together."""
    if chunk_bytes < 1:
        raise ConfigError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    if max_message_bytes < chunk_bytes + MESSAGE_OVERHEAD:
        raise ConfigError(
            f"max_message_bytes ({max_message_bytes}) must exceed chunk_bytes ({chunk_bytes}) "
            f"by at least {MESSAGE_OVERHEAD} bytes: raise max_message_bytes or lower chunk_bytes"
        )
    if max_payload_bytes < 1:
        raise ConfigError(f"max_payload_bytes must be >= 1, got {max_payload_bytes}")


# ------------------------------------------------------------------------------------ payloads


@dataclass(frozen=True)
class Payload:
    """Arrays serialized once and cut into chunks, ready to be sent to any number of peers."""

    chunks: tuple[bytes, ...]
    size: int
    sha256: bytes

    def pieces(self) -> Iterator[tuple[int, bytes, bool]]:
        """``(offset, data, last)`` for each chunk, in order."""
        offset = 0
        for i, data in enumerate(self.chunks):
            yield offset, data, i == len(self.chunks) - 1
            offset += len(data)


def encode(arrays: Arrays, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Payload:
    """Serialize ``arrays`` (``pollinate.serde``) and cut the bytes into chunks."""
    if chunk_bytes < 1:
        raise ConfigError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    data = serde.dumps(arrays)
    view = memoryview(data)
    chunks = tuple(bytes(view[i : i + chunk_bytes]) for i in range(0, len(data), chunk_bytes))
    digest = hashlib.sha256(view).digest()
    view.release()
    return Payload(chunks, len(data), digest)


@dataclass(frozen=True)
class Broadcast:
    """A task's Arrays as serialized ``ServerMessage`` chunk frames, identical for every client.

    The server's chunks leave ``task_id`` empty: on the server's half of a stream a task's
    chunks always follow its ``Task`` header with nothing in between, so they need no id. That
    makes the frames the same bytes for every client: serialized once per round and shared,
    instead of a protobuf message and a serialized copy per client per chunk.
    """

    frames: tuple[bytes, ...]
    size: int
    sha256: bytes


def broadcast(arrays: Arrays, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Broadcast:
    """Serialize ``arrays`` once into ready-to-send chunk frames (see :class:`Broadcast`)."""
    payload = encode(arrays, chunk_bytes)
    frames = tuple(
        pb.ServerMessage(chunk=pb.Chunk(offset=offset, data=data, last=last)).SerializeToString()
        for offset, data, last in payload.pieces()
    )
    return Broadcast(frames, payload.size, payload.sha256)


def serialize_server_message(msg: pb.ServerMessage | bytes) -> bytes:
    """gRPC's serializer for the server's half of a stream: frames pass through as they are."""
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


def decode(data: np.ndarray, max_bytes: int, *, writeable: bool = False) -> Arrays:
    """The Arrays in an assembled payload: views into ``data``, read-only unless ``writeable``."""
    try:
        arrays = serde.loads(data.data, max_bytes=max_bytes)
    except SerializationError as e:
        raise ProtocolError(f"the payload is not valid Arrays: {e}") from None
    if writeable:  # the caller owns ``data``: let a client change its arrays in place
        for a in arrays:
            a.flags.writeable = True
    return arrays


class Assembler:
    """Rebuilds one payload from its chunks, checking offsets, size and SHA-256.

    ``keep=False`` checks the stream but stores nothing (for a late result being discarded).
    """

    def __init__(
        self, what: str, size: int, sha256: bytes, *, max_bytes: int, keep: bool = True
    ) -> None:
        if size < 1:
            raise ProtocolError(f"{what}: declared payload size {size} (must be >= 1)")
        if size > max_bytes:
            raise ProtocolError(
                f"{what}: payload of {size} bytes exceeds the limit of {max_bytes} bytes "
                "(max_payload_bytes)"
            )
        if len(sha256) != 32:
            raise ProtocolError(f"{what}: payload SHA-256 must be 32 bytes, got {len(sha256)}")
        self.what = what
        self.size = size
        self.received = 0
        self._expected = bytes(sha256)
        self._hash = hashlib.sha256()
        # np.empty maps pages lazily: memory is committed only as data arrives
        self._buf: np.ndarray | None = np.empty(size, dtype=np.uint8) if keep else None

    @property
    def complete(self) -> bool:
        return self.received == self.size

    def add(self, offset: int, data: bytes, last: bool) -> bool:
        """Take the next chunk; return True when the payload is complete and verified."""
        if self.complete:
            raise ProtocolError(f"{self.what}: a chunk after the last one")
        if offset != self.received:
            raise ProtocolError(
                f"{self.what}: chunk at offset {offset}, expected {self.received} "
                "(chunks must be contiguous and in order)"
            )
        n = len(data)
        if n == 0:
            raise ProtocolError(f"{self.what}: an empty chunk at offset {offset}")
        end = offset + n
        if end > self.size:
            raise ProtocolError(
                f"{self.what}: chunk ends at byte {end}, past the declared size {self.size}"
            )
        if last != (end == self.size):
            state = "marked last" if last else "not marked last"
            raise ProtocolError(
                f"{self.what}: chunk ending at byte {end} of {self.size} is {state}"
            )
        if self._buf is not None:
            self._buf[offset:end] = np.frombuffer(data, dtype=np.uint8)
        self._hash.update(data)
        self.received = end
        if last and self._hash.digest() != self._expected:
            raise CorruptPayload(
                f"{self.what}: SHA-256 of the {self.size} bytes received does not match the "
                "declared one (the payload was corrupted)"
            )
        return last

    def discard(self) -> None:
        """Stop storing (the payload is no longer wanted); later chunks are still checked."""
        self._buf = None

    def result(self) -> np.ndarray:
        """The verified payload bytes (after ``add`` returned True)."""
        if not self.complete or self._buf is None:
            raise ProtocolError(f"{self.what}: payload incomplete ({self.received}/{self.size})")
        return self._buf


# ---------------------------------------------------------------------------- config, metrics


def dumps_scalars(values: Mapping[str, object], what: str) -> str:
    """A flat dict of scalars as JSON text (``TypeError`` if it is not flat scalars)."""
    check_scalars(values, what)
    return json.dumps(to_python_scalars(values), separators=(",", ":"))


def loads_scalars(text: str, what: str) -> dict[str, Scalar]:
    """Parse JSON text that must be an object of flat scalars; ``ProtocolError`` otherwise."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object, got {type(value).__name__}")
    if len(value) > MAX_JSON_KEYS:
        raise ProtocolError(f"{what} has {len(value)} keys (at most {MAX_JSON_KEYS})")
    try:
        check_scalars(value, what)
    except TypeError as e:
        raise ProtocolError(str(e)) from None
    return value


# -------------------------------------------------------------------------------- signatures


def _fields(*parts: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def register_digest(client_id: int, public_key: str, version: str, protocol: int) -> bytes:
    """What a Register signs: the client id, its public key, version and protocol."""
    return hashlib.sha256(
        _fields(
            b"register",
            str(client_id).encode(),
            public_key.encode(),
            version.encode(),
            str(protocol).encode(),
        )
    ).digest()


def result_digest(res: pb.Result) -> bytes:
    """What a Result header signs: every field but the signature (the payload by its SHA-256)."""
    return hashlib.sha256(
        _fields(
            b"result",
            res.task_id.encode(),
            b"1" if res.ok else b"0",
            res.error.encode(),
            str(res.num_examples).encode(),
            struct.pack(">d", res.loss),
            res.metrics_json.encode(),
            str(res.payload_size).encode(),
            res.payload_sha256,
        )
    ).digest()


def status_digest() -> bytes:
    """What a status request signs: only its kind (the signature's timestamp and nonce make
    each request unique)."""
    return hashlib.sha256(_fields(b"status")).digest()


def to_signed(sig: Signature) -> pb.Signed:
    """An ``auth.Signature`` as its protobuf message."""
    return pb.Signed(timestamp=sig.timestamp, nonce=sig.nonce, signature=sig.signature)


def from_signed(msg: pb.Signed) -> Signature:
    """A protobuf ``Signed`` as an ``auth.Signature`` (checked by ``auth.Verifier``)."""
    return Signature(msg.timestamp, bytes(msg.nonce), bytes(msg.signature))
