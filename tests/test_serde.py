"""Arrays ⇄ bytes: exact round trips, views not copies, and hostile input rejected cleanly."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest

from pollinate import serde
from pollinate.errors import SerializationError

try:
    import hypothesis
    from hypothesis import strategies as st
except ImportError:  # the seeded loop below covers the same ground
    hypothesis = None


def _arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    big = rng.standard_normal((513, 257)).astype(np.float32)
    return [
        np.array(3.5),  # 0-d
        np.array(7, dtype=np.int8),
        np.zeros((0,), dtype=np.float32),  # empty
        np.zeros((3, 0, 2), dtype=np.int64),
        big,  # large
        big[::3, 1::2],  # non-contiguous view
        np.asfortranarray(rng.standard_normal((5, 7))),
        rng.standard_normal((4, 3)).astype(np.float16),
        np.array([True, False, True]),
        (rng.standard_normal(6) + 1j * rng.standard_normal(6)).astype(np.complex64),
        rng.standard_normal(5).astype(np.complex128),
        np.arange(10, dtype=">f4"),  # big-endian
        np.arange(10, dtype=">i8").reshape(2, 5),
        np.arange(-5, 5, dtype=np.int16),
        np.array([0, 255], dtype=np.uint8),
        np.array([2**63], dtype=np.uint64),
        np.arange(24, dtype=np.int32).reshape(2, 3, 4),
        np.array([np.inf, -np.inf, np.nan]),
    ]


def _check_equal(a: np.ndarray, b: np.ndarray) -> None:
    assert b.dtype == a.dtype
    assert b.shape == a.shape
    np.testing.assert_array_equal(b, a)


def test_round_trip_of_many_dtypes_and_shapes() -> None:
    arrays = _arrays()
    decoded = serde.loads(serde.dumps(arrays))
    assert len(decoded) == len(arrays)
    for a, b in zip(arrays, decoded):
        _check_equal(a, b)


@pytest.mark.parametrize("index", range(len(_arrays())))
def test_each_array_round_trips_alone(index: int) -> None:
    a = _arrays()[index]
    for data in (serde.dumps([a]), bytes(serde.dumps([a]))):
        (b,) = serde.loads(data)
        _check_equal(a, b)


def test_empty_list_round_trips() -> None:
    assert serde.loads(serde.dumps([])) == []


def test_loads_returns_read_only_views_of_the_buffer() -> None:
    arrays = [np.arange(1000, dtype=np.float64), np.ones((16, 16), dtype=np.float32)]
    data = serde.dumps(arrays)
    backing = np.frombuffer(data, dtype=np.uint8)
    decoded = serde.loads(data)
    for a in decoded:
        assert np.shares_memory(a, backing)
        assert not a.flags.writeable
    data[serde.ALIGN * 1 + 8 : serde.ALIGN * 1 + 16] = struct.pack("<d", 42.0)
    assert decoded[0][1] == 42.0  # a view sees changes to the buffer: no copy was made


def test_loads_with_copy_owns_writable_memory() -> None:
    data = serde.dumps([np.arange(100, dtype=np.int32)])
    (a,) = serde.loads(data, copy=True)
    assert not np.shares_memory(a, np.frombuffer(data, dtype=np.uint8))
    a[0] = 99  # writable
    assert serde.loads(data)[0][0] == 0


def test_data_is_aligned_for_every_array() -> None:
    data = serde.dumps(_arrays())
    for a in serde.loads(data):
        if a.nbytes:
            offset = a.__array_interface__["data"][0] - np.frombuffer(data, np.uint8).ctypes.data
            assert offset % serde.ALIGN == 0


def test_truncated_payload_raises_at_every_cut_point() -> None:
    arrays = [np.arange(5, dtype=np.float32), np.ones((2, 3), dtype=np.int16), np.array(1.0)]
    data = bytes(serde.dumps(arrays))
    decoded = serde.loads(data)
    end = max(a.__array_interface__["data"][0] + a.nbytes for a in decoded)
    content = end - np.frombuffer(data, np.uint8).ctypes.data  # last byte that carries data
    for cut in range(len(data)):
        if cut < content:
            with pytest.raises(SerializationError):
                serde.loads(data[:cut])
        else:  # only trailing padding was lost: the arrays are still all there
            for a, b in zip(arrays, serde.loads(data[:cut])):
                _check_equal(a, b)


def test_bad_magic_is_rejected() -> None:
    data = bytearray(serde.dumps([np.zeros(3)]))
    data[:4] = b"PKL1"
    with pytest.raises(SerializationError, match="magic"):
        serde.loads(data)
    with pytest.raises(SerializationError):
        serde.loads(b"")


def test_max_bytes_limits_the_payload() -> None:
    data = serde.dumps([np.zeros(1000)])
    assert len(serde.loads(data, max_bytes=len(data))) == 1
    with pytest.raises(SerializationError, match="exceeds"):
        serde.loads(data, max_bytes=len(data) - 1)


@pytest.mark.parametrize(
    "array",
    [
        np.array([object(), 1], dtype=object),
        np.zeros(3, dtype=[("a", "<f4"), ("b", "<i4")]),  # structured (void)
        np.zeros(3, dtype="V8"),
        np.array(["ab", "c"]),
        np.array([b"ab"]),
        np.array(["2020-01-01"], dtype="datetime64[D]"),
        np.array([1], dtype="timedelta64[s]"),
    ],
    ids=["object", "structured", "void", "unicode", "bytes", "datetime", "timedelta"],
)
def test_forbidden_dtypes_cannot_be_encoded(array: np.ndarray) -> None:
    with pytest.raises(SerializationError, match="dtype"):
        serde.dumps([array])


def test_non_arrays_cannot_be_encoded() -> None:
    with pytest.raises(SerializationError, match="not a NumPy array"):
        serde.dumps([[1.0, 2.0]])  # type: ignore[list-item]


def _craft(dtype: bytes, shape: tuple[int, ...], *, offset: int = 64, extra: int = 64) -> bytes:
    """One hand-made array header, its data at ``offset``, then ``extra`` bytes."""
    head = b"PLN1" + struct.pack("<I", 1) + bytes([len(dtype)]) + dtype + bytes([len(shape)])
    head += struct.pack(f"<{len(shape)}Q", *shape) + struct.pack("<Q", offset)
    data_start = offset if offset < 4096 else 64  # far-away offsets point past the end
    return head + b"\0" * (max(0, data_start - len(head)) + extra)


def test_crafted_header_decodes_when_valid() -> None:
    (a,) = serde.loads(_craft(b"<f4", (2, 3), extra=24))
    assert a.shape == (2, 3) and a.dtype == np.float32 and not a.any()


@pytest.mark.parametrize(
    "dtype",
    [
        b"O",
        b"|O",
        b"f4,O",
        b"<f4,O",
        b"V8",
        b"|V0",
        b"(2,)f4",
        b"<U2",
        b"S4",
        b"<M8[s]",
        b"f4,",
        b"[",
        b"06V",
        b"a",
        b"i4 ",
        b"<f0",
        b"\xff\xfe",
        b"",
        b"=f4",
        b"float32",
        b"<f4\x00",
    ],
)
def test_crafted_dtype_strings_are_rejected(dtype: bytes) -> None:
    with pytest.raises(SerializationError, match="dtype|malformed"):
        serde.loads(_craft(dtype, (1,)))


@pytest.mark.parametrize(
    "shape",
    [
        (2**63, 2**63),
        (2**64 - 1,),
        (2**40, 2**40, 2**40),
        (0, 2**64 - 1),  # zero bytes, but NumPy cannot hold such a shape
        (0, 2**40, 2**40),
        (2**32, 2**32, 0),
        (1,) * 31 + (2**62,),
    ],
)
def test_huge_claimed_shapes_raise_without_allocating(shape: tuple[int, ...]) -> None:
    with pytest.raises(SerializationError):
        serde.loads(_craft(b"<f8", shape))


def test_too_many_dimensions_are_rejected() -> None:
    with pytest.raises(SerializationError, match="dimensions"):
        serde.loads(_craft(b"<f4", (1,) * (serde.MAX_NDIM + 1), offset=512))


def test_huge_claimed_array_count_raises_quickly() -> None:
    for count in (serde.MAX_ARRAYS + 1, 2**32 - 1, serde.MAX_ARRAYS):
        data = b"PLN1" + struct.pack("<I", count) + b"\x03<f4\x01" + b"\0" * 40
        with pytest.raises(SerializationError):
            serde.loads(data)


def test_data_offsets_outside_the_payload_are_rejected() -> None:
    with pytest.raises(SerializationError, match="outside"):
        serde.loads(_craft(b"<f4", (4,), offset=2**63))
    with pytest.raises(SerializationError, match="outside"):
        serde.loads(_craft(b"<f4", (4,), offset=8))  # overlapping the header


def _mutations(rng: random.Random, seed_payloads: list[bytes], n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        data = bytearray(rng.choice(seed_payloads))
        for _ in range(rng.randint(1, 8)):
            op = rng.random()
            if op < 0.5 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif op < 0.7:
                data = data[: rng.randrange(len(data) + 1)]
            elif op < 0.85:
                pos = rng.randrange(len(data) + 1)
                data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 9)))
            else:
                pos = rng.randrange(max(1, len(data) - 8))
                data[pos : pos + 8] = struct.pack("<Q", rng.choice([0, 1, 2**31, 2**63, 2**64 - 1]))
        out.append(bytes(data))
    return out


def _decodes_or_serialization_error(data: bytes) -> None:
    try:
        arrays = serde.loads(data)
    except SerializationError:
        return
    for a in arrays:  # what does decode is a plain numeric array inside the payload
        assert isinstance(a, np.ndarray) and a.dtype.kind in "biufc"
        assert a.nbytes <= len(data)


def _seed_payloads() -> list[bytes]:
    return [
        bytes(serde.dumps([np.arange(6, dtype=np.float32).reshape(2, 3), np.array(1, np.int8)])),
        bytes(serde.dumps([np.zeros((0, 4)), np.ones(3, dtype=">c8")])),
        bytes(serde.dumps([])),
        _craft(b"<f8", (3,), extra=24),
    ]


def test_fuzz_mutated_payloads_only_raise_serialization_error() -> None:
    rng = random.Random(1234)
    for data in _mutations(rng, _seed_payloads(), 4000):
        _decodes_or_serialization_error(data)


def test_fuzz_random_bytes_only_raise_serialization_error() -> None:
    rng = random.Random(99)
    for _ in range(3000):
        body = bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
        _decodes_or_serialization_error(body)
        _decodes_or_serialization_error(b"PLN1" + body)


if hypothesis is not None:

    @hypothesis.settings(max_examples=300, deadline=None)
    @hypothesis.given(st.binary(max_size=300))
    def test_hypothesis_random_bytes(body: bytes) -> None:
        _decodes_or_serialization_error(body)
        _decodes_or_serialization_error(b"PLN1" + body)


def test_padding_is_zeroed_so_no_stale_memory_is_sent() -> None:
    arrays = [np.ones(3, np.int8), np.full(5, -1, np.int16), np.zeros((0, 2)), np.array(True)]
    for _ in range(3):  # fresh buffers may reuse memory that held other bytes
        np.full(1 << 20, 0xAB, dtype=np.uint8).sum()
        data = np.frombuffer(serde.dumps(arrays), dtype=np.uint8)
        head = 8 + sum(1 + len(a.dtype.str) + 1 + 8 * a.ndim + 8 for a in arrays)
        padding = np.ones(len(data), dtype=bool)
        padding[:head] = False
        for a in serde.loads(data):
            start = a.__array_interface__["data"][0] - data.ctypes.data
            padding[start : start + a.nbytes] = False
        assert padding.sum() > 200  # header padding, gaps between arrays, the tail
        assert not data[padding].any()
