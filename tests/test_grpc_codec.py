"""The gRPC wire codec: chunked, checksummed payloads, JSON scalars, signed digests."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pollinate.errors import ConfigError
from pollinate.transport.grpc import pollinate_pb2 as pb
from pollinate.transport.grpc.client import Backoff
from pollinate.transport.grpc.codec import (
    Assembler,
    CorruptPayload,
    ProtocolError,
    check_sizes,
    decode,
    dumps_scalars,
    encode,
    loads_scalars,
    register_digest,
    result_digest,
)

MAX = 1 << 30
REPO = Path(__file__).resolve().parents[1]


def sample_arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        rng.standard_normal((37, 11)).astype(np.float32),
        np.arange(1000, dtype=np.int64),
        np.array([True, False, True]),
        np.zeros((0, 4), dtype=np.float64),
        np.array(3.5),
    ]


def assemble(payload, max_bytes: int = MAX) -> Assembler:
    asm = Assembler("test payload", payload.size, payload.sha256, max_bytes=max_bytes)
    for offset, data, last in payload.pieces():
        assert asm.add(offset, data, last) == last
    return asm


@pytest.mark.parametrize("chunk_bytes", [1, 64, 1000, 4096, 1 << 20])
def test_round_trip_any_chunk_size(chunk_bytes: int) -> None:
    arrays = sample_arrays()
    payload = encode(arrays, chunk_bytes)
    assert sum(len(c) for c in payload.chunks) == payload.size
    assert all(len(c) <= chunk_bytes for c in payload.chunks)
    out = decode(assemble(payload).result(), MAX)
    assert len(out) == len(arrays)
    for a, b in zip(arrays, out):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_empty_arrays_and_writeable_views() -> None:
    assert decode(assemble(encode([])).result(), MAX) == []
    payload = encode([np.arange(4.0)])
    out = decode(assemble(payload).result(), MAX)
    assert not out[0].flags.writeable
    out = decode(assemble(payload).result(), MAX, writeable=True)
    out[0][0] = 9.0  # the receiver owns its buffer
    assert out[0][0] == 9.0


def test_chunks_are_shared_across_sends() -> None:
    payload = encode(sample_arrays(), 256)
    first = [data for _, data, _ in payload.pieces()]
    second = [data for _, data, _ in payload.pieces()]
    assert all(a is b for a, b in zip(first, second))  # serialized once, reused


def pieces_of(size: int = 5000, chunk: int = 1000):
    payload = encode([np.arange(size // 8, dtype=np.int64)], chunk)
    return payload, list(payload.pieces())


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p: [p[1], p[0], *p[2:]], "expected 0"),  # out of order
        (lambda p: [p[0], *p[2:]], "expected"),  # a gap
        (lambda p: [p[0], p[0], *p[1:]], "expected"),  # a repeat (overlap)
        (lambda p: [*p[:-1], (p[-1][0], p[-1][1] + b"x", True)], "past the declared size"),
        (lambda p: [*p[:-1], (p[-1][0], p[-1][1], False)], "not marked last"),
        (lambda p: [(p[0][0], p[0][1], True), *p[1:]], "is marked last"),
        (lambda p: [(0, b"", False), *p], "empty chunk"),
        (lambda p: [*p, (p[-1][0] + len(p[-1][1]), b"more", True)], "after the last"),
        (
            lambda p: [*p[:-1], (p[-1][0], bytes(len(p[-1][1])), True)],
            "does not match",
        ),  # corrupted bytes
    ],
)
def test_assembler_refuses_bad_streams(mutate, message: str) -> None:
    payload, pieces = pieces_of()
    asm = Assembler("result of task 't'", payload.size, payload.sha256, max_bytes=MAX)
    with pytest.raises(ProtocolError, match=message) as err:
        for offset, data, last in mutate(pieces):
            asm.add(offset, data, last)
    assert "result of task 't'" in str(err.value)
    # only damaged bytes in a sound stream spare the stream; bad framing ends it
    assert isinstance(err.value, CorruptPayload) == (message == "does not match")


def test_assembler_refuses_bad_headers() -> None:
    payload, _ = pieces_of()
    with pytest.raises(ProtocolError, match="exceeds the limit of 100 bytes"):
        Assembler("x", payload.size, payload.sha256, max_bytes=100)
    with pytest.raises(ProtocolError, match="size 0"):
        Assembler("x", 0, payload.sha256, max_bytes=MAX)
    with pytest.raises(ProtocolError, match="SHA-256 must be 32 bytes"):
        Assembler("x", payload.size, b"short", max_bytes=MAX)


def test_discarding_assembler_still_checks_the_stream() -> None:
    payload, pieces = pieces_of()
    asm = Assembler("x", payload.size, payload.sha256, max_bytes=MAX, keep=False)
    asm.add(*pieces[0])
    with pytest.raises(ProtocolError, match="expected"):
        asm.add(*pieces[2])
    asm = Assembler("x", payload.size, payload.sha256, max_bytes=MAX)
    asm.add(*pieces[0])
    asm.discard()
    for piece in pieces[1:]:
        asm.add(*piece)
    with pytest.raises(ProtocolError):
        asm.result()  # nothing kept


def test_decode_refuses_bytes_that_are_not_arrays() -> None:
    junk = np.frombuffer(b"PLN1" + bytes(60), dtype=np.uint8).copy()
    junk[4] = 200  # claims 200 arrays in a 64-byte payload
    with pytest.raises(ProtocolError, match="not valid Arrays"):
        decode(junk, MAX)
    with pytest.raises(ProtocolError, match="bad magic"):
        decode(np.zeros(64, dtype=np.uint8), MAX)


def test_scalars_round_trip_and_validation() -> None:
    values = {"lr": 0.1, "epochs": 3, "name": "x", "flag": True, "n": np.int64(4)}
    text = dumps_scalars(values, "config")
    assert loads_scalars(text, "config") == {
        "lr": 0.1,
        "epochs": 3,
        "name": "x",
        "flag": True,
        "n": 4,
    }
    assert loads_scalars("", "metrics") == {}
    with pytest.raises(TypeError, match="config"):
        dumps_scalars({"nested": [1, 2]}, "config")
    for bad, message in [
        ("[1, 2]", "must be a JSON object"),
        ('{"a": {"b": 1}}', r"metrics\['a'\] must be int, float, str or bool"),
        ('{"a": [1]}', "must be int, float, str or bool"),
        ('{"a": null}', "must be int, float, str or bool"),
        ("{not json", "not valid JSON"),
        ("[" * 100_000, "not valid JSON"),
    ]:
        with pytest.raises(ProtocolError, match=message):
            loads_scalars(bad, "metrics")
    many = "{" + ",".join(f'"k{i}": 1' for i in range(10_001)) + "}"
    with pytest.raises(ProtocolError, match="keys"):
        loads_scalars(many, "metrics")


def test_result_digest_covers_every_field() -> None:
    base = dict(
        task_id="1.train.3.7",
        ok=True,
        error="",
        num_examples=10,
        loss=0.5,
        metrics_json='{"a":1}',
        payload_size=640,
        payload_sha256=bytes(32),
    )
    digest = result_digest(pb.Result(**base))
    assert digest == result_digest(pb.Result(**base, signed=pb.Signed(timestamp=1.0)))
    changes = dict(
        task_id="1.train.3.8",
        ok=False,
        error="e",
        num_examples=11,
        loss=0.25,
        metrics_json='{"a":2}',
        payload_size=641,
        payload_sha256=b"\x01" * 32,
    )
    for key, value in changes.items():
        assert result_digest(pb.Result(**{**base, key: value})) != digest, key
    reg = register_digest(3, "key", "0.1.0", 1)
    assert reg != register_digest(4, "key", "0.1.0", 1)
    assert reg != register_digest(3, "other", "0.1.0", 1)
    assert reg != register_digest(3, "key", "0.1.0", 2)


def test_size_limits_must_fit_together() -> None:
    check_sizes(1 << 20, 4 << 20, 1 << 30)
    with pytest.raises(ConfigError, match="max_message_bytes"):
        check_sizes(4 << 20, 4 << 20, 1 << 30)
    with pytest.raises(ConfigError, match="chunk_bytes"):
        check_sizes(0, 4 << 20, 1 << 30)


def test_backoff_is_exponential_with_full_jitter() -> None:
    backoff = Backoff(initial_s=0.5, factor=2.0, max_s=30.0)
    rng = random.Random(0)
    for attempt, cap in [(0, 0.5), (1, 1.0), (3, 4.0), (6, 30.0), (50, 30.0), (10_000, 30.0)]:
        delays = [backoff.delay(attempt, rng) for _ in range(200)]
        assert all(0.0 <= d <= cap for d in delays)
        assert max(delays) > 0.8 * cap and min(delays) < 0.2 * cap  # spread over [0, cap]


def test_generated_modules_match_the_proto(tmp_path: Path) -> None:
    protoc = pytest.importorskip("grpc_tools.protoc")
    from importlib.metadata import version

    from pollinate.transport.grpc import pollinate_pb2_grpc

    tools, made_with = version("grpcio-tools"), pollinate_pb2_grpc.GRPC_GENERATED_VERSION
    if tools != made_with:  # another generator writes other (equally valid) code
        pytest.skip(f"grpcio-tools {tools} installed; the modules were made with {made_with}")
    folder = "pollinate/transport/grpc"
    (tmp_path / folder).mkdir(parents=True)
    shutil.copy(REPO / folder / "pollinate.proto", tmp_path / folder)
    out = str(tmp_path)
    args = [sys.executable, "-m", "grpc_tools.protoc", f"-I{out}", f"--python_out={out}"]
    args += [
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        str(tmp_path / folder / "pollinate.proto"),
    ]
    # in its own process: protoc's C++ runtime crashes beside other protobuf runtimes that
    # earlier tests loaded (TensorFlow)
    assert protoc is not None and subprocess.run(args, check=False).returncode == 0
    for name in ("pollinate_pb2.py", "pollinate_pb2.pyi", "pollinate_pb2_grpc.py"):
        fresh = (tmp_path / folder / name).read_text()
        assert fresh == (REPO / folder / name).read_text(), f"{name} is stale: run `make proto`"
