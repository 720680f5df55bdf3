"""Update compression: unbiasedness, error bounds, error feedback, payloads and the wrapper."""

from __future__ import annotations

import math
import pickle
from typing import Any

import numpy as np
import pytest

from pollinate import serde
from pollinate.client import ClientContext, MemoryStateStore
from pollinate.compression import (
    CODECS,
    QSGD,
    RESIDUAL_KEY,
    CompressingClient,
    Compression,
    TopK,
    decode_model,
    decode_update,
    encode_model,
    encode_update,
    from_bfloat16,
    make_codec,
    pack_bits,
    to_bfloat16,
    unpack_bits,
)
from pollinate.config import from_dict
from pollinate.errors import ConfigError, UpdateRejected
from pollinate.simulation.backends.sequential import SequentialBackend
from pollinate.simulation.engine import SimulationExecutor
from pollinate.types import TrainIns, TrainRes
from tests.fakes import MeanClient, MeanClientFn


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _delta(seed: int = 0) -> list[np.ndarray]:
    rng = _rng(seed)
    return [rng.normal(size=(40, 25)), rng.normal(scale=1e-3, size=17), np.zeros((2, 3))]


# QSGD ------------------------------------------------------------------------------------


def test_qsgd_is_unbiased() -> None:
    # one vector of 96 coordinates in 3 buckets of 32, tiled 20,000 times: the buckets of
    # the tiled array are the buckets of each copy, so one encode gives 20,000 independent
    # quantizations
    v = _rng(1).normal(size=96)
    draws = 20_000
    codec = QSGD(bits=2, bucket_size=32)  # s = 3 levels: coarse, so the noise is large
    tiled = np.tile(v, draws)
    (q,) = codec.decode(codec.encode([tiled], _rng(2), {}), [tiled])
    q = q.reshape(draws, 96)
    step = np.repeat(np.linalg.norm(v.reshape(3, 32), axis=1), 32) / codec.levels
    # each Q_i takes two neighbouring levels one step n/s apart: sd <= step/2, so the mean of
    # 20,000 draws is within 5 sds, 5·step/(2·√20000) = 0.018 steps, of v_i
    assert q.std(axis=0).max() > 0.1 * step.min()  # it is noisy, not exact
    assert (np.abs(q.mean(axis=0) - v) <= 5 * step / (2 * math.sqrt(draws))).all()
    assert (np.abs(q - v) < step).all()  # never more than one level away
    # the paper's variance bound, per bucket of d = 32: min(d/s², √d/s)·‖v‖²
    sq = ((q - v) ** 2).reshape(draws, 3, 32).sum(axis=2).mean(axis=0)
    bound = min(32 / 9, math.sqrt(32) / 3) * np.linalg.norm(v.reshape(3, 32), axis=1) ** 2
    assert (sq <= bound).all()


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 12, 16])
def test_qsgd_error_bound_and_payload_size(bits: int) -> None:
    delta = _delta()
    codec = QSGD(bits=bits, bucket_size=100)
    payload = codec.encode(delta, _rng(), {})
    decoded = codec.decode(serde.loads(serde.dumps(payload)), delta)
    for d, q in zip(delta, decoded):
        flat, back = d.reshape(-1), q.reshape(-1)
        buckets = -(-flat.size // 100)
        norms = np.array([np.linalg.norm(flat[i * 100 : (i + 1) * 100]) for i in range(buckets)])
        step = np.repeat(norms, 100)[: flat.size] / (2**bits - 1)
        assert (np.abs(back - flat) <= step * (1 + 1e-6)).all()
        assert (np.sign(back) * np.sign(flat) >= 0).all()  # signs are kept
    # bytes: per array 4 per bucket, 1 bit of sign and `bits` bits of level per coordinate
    sizes = [a.nbytes for a in payload]
    assert sizes[:3] == [4 * 10, 1000 // 8, math.ceil(1000 * bits / 8)]
    assert sizes[3:6] == [4, 3, math.ceil(17 * bits / 8)]


@pytest.mark.parametrize("bits", [3, 8])
def test_qsgd_in_pieces_is_qsgd_on_the_whole(bits: int) -> None:
    # 600,001 coordinates are quantized in three pieces of 262,000 (whole buckets of 100, whole
    # bytes of bits): the payload must read as one quantization of the whole array
    v = _rng(6).normal(size=600_001)
    codec = QSGD(bits=bits, bucket_size=100)
    norms, signs, packed = codec.encode([v], _rng(), {})
    exact = [np.linalg.norm(v[i : i + 100]) for i in range(0, v.size, 100)]
    assert norms.size == 6001 and (norms >= np.array(exact)).all()
    np.testing.assert_allclose(norms, exact, rtol=2.0**-22)  # rounded up to float32
    level = unpack_bits(packed, v.size, bits).astype(np.float64)
    sign = 1.0 - 2.0 * np.unpackbits(signs, count=v.size)
    whole = np.repeat(norms.astype(np.float64), 100)[: v.size] * sign * level / (2**bits - 1)
    (decoded,) = codec.decode([norms, signs, packed], [v])
    np.testing.assert_array_equal(decoded, whole)
    step = np.repeat(norms.astype(np.float64), 100)[: v.size] / (2**bits - 1)
    assert (np.abs(decoded - v) <= step).all()


@pytest.mark.parametrize("bits", range(1, 17))
def test_bit_packing_round_trips(bits: int) -> None:
    levels = _rng(bits).integers(0, 2**bits, size=37).astype(np.uint16)
    packed = pack_bits(levels, bits)
    assert packed.dtype == np.uint8 and packed.size == math.ceil(37 * bits / 8)
    np.testing.assert_array_equal(unpack_bits(packed, 37, bits), levels)


def test_qsgd_by_hand() -> None:
    # v = (3, -4): norm 5; with s = 1 (1 bit) the level of |v_i|/5 is 1 with probability
    # 0.6 (resp. 0.8), so Q is (±5·1, 0)-like: each coordinate is 0 or ±5
    codec = QSGD(bits=1, bucket_size=2)
    seen = set()
    for seed in range(200):
        (q,) = codec.decode(codec.encode([np.array([3.0, -4.0])], _rng(seed), {}), [np.zeros(2)])
        seen.add(tuple(q))
    assert seen == {(0.0, 0.0), (5.0, 0.0), (0.0, -5.0), (5.0, -5.0)}


# float16 / bfloat16 ----------------------------------------------------------------------


def test_fp16_and_bf16_error_bounds() -> None:
    x = np.concatenate([_rng(3).normal(scale=s, size=500) for s in (1e-6, 1e-3, 1.0, 100.0)])
    (h,) = make_codec("fp16").decode(make_codec("fp16").encode([x], _rng(), {}), [x])
    assert (np.abs(h - x) <= np.maximum(2.0**-11 * np.abs(x), 2.0**-25)).all()
    assert np.abs(h - x).max() > 0  # it does round
    payload = make_codec("bf16").encode([x], _rng(), {})
    assert payload[0].dtype == np.uint16 and payload[0].nbytes == 2 * x.size
    (b,) = make_codec("bf16").decode(payload, [x])
    assert (np.abs(b - x) <= (2.0**-8 + 2.0**-24) * np.abs(x)).all()
    assert np.abs(b - x).max() > 2.0**-11 * np.abs(x).max() / 10  # coarser than fp16


def test_bfloat16_rounds_to_nearest_even() -> None:
    x = np.array([1.0, 1 + 2.0**-8, 1 + 3 * 2.0**-8, 1 + 2.0**-8 + 2.0**-20, -2.5, np.inf])
    bits = to_bfloat16(x)
    assert bits.tolist() == [0x3F80, 0x3F80, 0x3F82, 0x3F81, 0xC020, 0x7F80]
    np.testing.assert_array_equal(
        from_bfloat16(bits), [1.0, 1.0, 1 + 2.0**-6, 1 + 2.0**-7, -2.5, np.inf]
    )
    assert np.isnan(from_bfloat16(to_bfloat16(np.array([np.nan]))))[0]


# top-k with error feedback ---------------------------------------------------------------


def test_topk_sends_k_values_and_carries_the_rest_by_hand() -> None:
    codec = TopK(fraction=0.4)  # k = ⌈0.4 · 5⌉ = 2 of 5 coordinates
    state: dict[str, Any] = {}
    delta = [np.array([0.5, -3.0]), np.array([[1.0, 0.25, 2.0]])]
    index, values = codec.encode(delta, _rng(), state)
    assert index.dtype == np.int32 and values.dtype == np.float32
    assert index.tolist() == [1, 4] and values.tolist() == [-3.0, 2.0]
    np.testing.assert_array_equal(state[RESIDUAL_KEY], [0.5, 0, 1.0, 0.25, 0])
    sent = codec.decode([index, values], delta)
    np.testing.assert_array_equal(sent[0], [0, -3.0])
    np.testing.assert_array_equal(sent[1], [[0, 0, 2.0]])
    # next round: Δ' + e = (1.25, 0, 1, 0.25, 0): the old residual goes out now
    index, values = codec.encode([np.array([0.75, 0.0]), np.zeros((1, 3))], _rng(), state)
    assert index.tolist() == [0, 2] and values.tolist() == [1.25, 1.0]
    np.testing.assert_array_equal(state[RESIDUAL_KEY], [0, 0, 0, 0.25, 0])


def test_topk_residual_plus_sent_is_delta_plus_previous_residual() -> None:
    codec = TopK(fraction=0.05)
    state: dict[str, Any] = {}
    template = _delta()
    size = sum(a.size for a in template)
    k = math.ceil(0.05 * size)
    previous = np.zeros(size)
    for r in range(5):
        # dyadic values (multiples of 2^-10 below 64): every sum here is exact in float32
        rng = _rng(10 + r)
        delta = [np.round(rng.normal(size=a.shape) * 1024) / 1024 for a in template]
        payload = codec.encode(delta, rng, state)
        assert payload[0].size == payload[1].size == k  # exactly k values
        sent = np.concatenate([s.reshape(-1) for s in codec.decode(payload, template)])
        flat = np.concatenate([d.reshape(-1) for d in delta])
        np.testing.assert_array_equal(state[RESIDUAL_KEY] + sent, flat + previous)
        assert np.count_nonzero(state[RESIDUAL_KEY][payload[0]]) == 0
        # what was sent is the largest in magnitude
        assert np.abs(payload[1]).min() >= np.abs(state[RESIDUAL_KEY]).max()
        previous = state[RESIDUAL_KEY].astype(np.float64)


def test_topk_without_error_feedback_keeps_no_state() -> None:
    state: dict[str, Any] = {}
    TopK(0.1, error_feedback=False).encode(_delta(), _rng(), state)
    assert state == {}


# payloads on the server ------------------------------------------------------------------


def _model() -> list[np.ndarray]:
    rng = _rng(4)
    return [
        rng.normal(size=(40, 25)).astype(np.float32),
        np.arange(3, dtype=np.int64),
        rng.normal(size=17).astype(np.float64),
    ]


@pytest.mark.parametrize("name", CODECS)
def test_decode_update_gives_the_model_in_its_dtypes(name: str) -> None:
    w = _model()
    w_k = [
        (w[0] + 0.01 * _rng(5).normal(size=w[0].shape)).astype(np.float32),
        w[1] + 7,
        w[2] - 0.5,
    ]
    codec = make_codec(name, bits=8, topk_fraction=0.5)
    payload = encode_update(w_k, w, codec, _rng(), {})
    wire = serde.loads(serde.dumps(payload))  # it travels as it is
    out = decode_update(wire, w, codec)
    assert [a.dtype for a in out] == [a.dtype for a in w]
    assert [a.shape for a in out] == [a.shape for a in w]
    np.testing.assert_array_equal(out[1], w[1] + 7)  # integer arrays travel exactly
    if name == "none":  # Δ in float64: w + Δ is w_k again
        for a, b in zip(out, w_k):
            np.testing.assert_array_equal(a, b)
    elif name != "topk":
        np.testing.assert_allclose(out[0], w_k[0], atol=2e-3)
        np.testing.assert_allclose(out[2], w_k[2], atol=2e-2)
    else:  # half the coordinates: the largest (all of array 2's -0.5), the rest later
        np.testing.assert_allclose(out[2], w_k[2], atol=1e-6)


@pytest.mark.parametrize(
    "name, tamper, message",
    [
        ("fp16", lambda p: p[:1], "fp16 payload has 1 arrays, expected 2"),
        ("fp16", lambda p: [p[0].astype(np.float32), p[1]], r"array 0 is float32\[40, 25\]"),
        ("bf16", lambda p: [p[0][:3], p[1]], r"expected uint16\[40, 25\]"),
        ("qsgd", lambda p: [p[0] * -1, *p[1:]], "norms are negative"),
        ("qsgd", lambda p: [p[0], p[1][:-1], *p[2:]], "array 0's signs"),
        ("topk", lambda p: [p[0][::-1].copy(), p[1]], "ascending, distinct"),
        ("topk", lambda p: [p[0] + 10_000, p[1]], r"in \[0, 1017\)"),
        ("topk", lambda p: [p[0], np.full_like(p[1], np.nan)], "NaN"),
        ("topk", lambda p: [p[0][:-1], p[1][:-1]], r"expected int32\[509\]"),
        ("topk", lambda p: ["x", p[1]], "not an array"),
    ],
)  # fmt: skip
def test_malformed_payloads_are_rejected(name: str, tamper: Any, message: str) -> None:
    w = _model()
    codec = make_codec(name, topk_fraction=0.5)
    payload = encode_update([a + 1 for a in w], w, codec, _rng(), {})
    floats = len(payload) - 1  # the integer array travels last
    bad = tamper(payload[:floats]) + payload[floats:]
    with pytest.raises(UpdateRejected, match=message):
        decode_update(bad, w, codec)


def test_downlink_model_encoding() -> None:
    w = _model()
    for name, tol in (("fp16", 2.0**-11), ("bf16", 2.0**-8 + 2.0**-24)):
        payload = encode_model(w, name)
        assert serde.payload_size(payload) < serde.payload_size(w) * 0.6
        back = decode_model(serde.loads(serde.dumps(payload)))
        assert [a.dtype for a in back] == [a.dtype for a in w]
        np.testing.assert_array_equal(back[1], w[1])
        for i in (0, 2):
            assert (np.abs(back[i] - w[i]) <= tol * np.abs(w[i]) + 1e-30).all()
    assert encode_model(w, "none") is w
    for name in ("qsgd", "topk"):
        with pytest.raises(ConfigError, match="downlink compression must be one of"):
            encode_model(w, name)
    with pytest.raises(ValueError, match="not an encoded model"):
        decode_model(w)


# the client wrapper, through the engine --------------------------------------------------


def test_compressing_client_keeps_its_residual_between_rounds() -> None:
    arrays = [np.zeros((10, 10), np.float32), np.zeros(2, np.int64)]
    client_fn = CompressingClient(MeanClientFn(), "topk", topk_fraction=0.1)
    client_fn = pickle.loads(pickle.dumps(client_fn))  # picklable for process workers
    backend = SequentialBackend()
    backend.start(client_fn)
    store = MemoryStateStore()
    executor = SimulationExecutor(backend, seed=3, state_store=store)
    codec = make_codec("topk", topk_fraction=0.1)
    carried = np.zeros(100)
    for r in (1, 2):
        (outcome,) = executor.submit(r, "train", [(4, TrainIns(arrays, {}))], 60)
        res = outcome.result
        assert isinstance(res, TrainRes) and res.metrics["compression"] == "topk"
        assert res.arrays[0].size == res.arrays[1].size == 10  # 10 of 100 values
        model = decode_update(res.arrays, arrays, codec)
        np.testing.assert_array_equal(model[1], [1, 1])  # MeanClient's counter, exact
        # client 4 trains to 4.0 everywhere: Δ = 4 each round, plus what was left last time
        residual = store.get(4)[RESIDUAL_KEY]
        np.testing.assert_array_equal(residual + model[0].reshape(-1), 4.0 + carried)
        carried = residual.astype(np.float64)
    assert store.get(4)["rounds"] == 2  # the inner client's own state is kept too


def test_compressing_client_with_a_compressed_downlink() -> None:
    arrays = [np.full((3, 4), 0.1, np.float32), np.zeros(2, np.int64)]
    wrapped = Compression(uplink="fp16", downlink="bf16").client(MeanClientFn())
    client = wrapped(ClientContext(client_id=2, seed=9))
    sent = encode_model(arrays, "bf16")
    res = client.train(sent, {"seed": 9})
    received = decode_model(sent)
    assert received[0][0, 0] != np.float32(0.1)  # bf16 rounded it
    model = decode_update(res.arrays, arrays, make_codec("fp16"))
    # Δ = 2 − bf16(0.1) in fp16, added to the server's exact w
    step = np.float16(2.0 - received[0][0, 0].astype(np.float64)).astype(np.float64)
    expected = (np.float32(0.1).astype(np.float64) + step).astype(np.float32)
    assert model[0][0, 0] == expected
    evaluation = client.evaluate(sent, {})
    assert evaluation.loss == pytest.approx(abs(received[0][0, 0] - 2), rel=1e-6)
    direct = CompressingClient(MeanClient(ClientContext(client_id=2, seed=0), {}), "qsgd")
    with pytest.raises(TypeError, match="wraps a client, not a client_fn"):
        direct(ClientContext(client_id=2, seed=0))
    assert direct.train(arrays, {"seed": 1}).metrics["compression"] == "qsgd"


def test_same_seed_same_quantization() -> None:
    arrays = [np.zeros((8, 8), np.float32), np.zeros(2, np.int64)]
    payloads = []
    for _ in range(2):
        client = CompressingClient(MeanClientFn(), "qsgd", bits=2)(
            ClientContext(client_id=3, seed=0)
        )
        payloads.append(client.train([a + 0.3 for a in arrays], {"seed": 77}).arrays)
    for a, b in zip(*payloads):
        np.testing.assert_array_equal(a, b)


# config ----------------------------------------------------------------------------------


def test_compression_config_section() -> None:
    cfg = from_dict({"compression": {"uplink": "qsgd", "downlink": "fp16", "bits": 4}})
    c = Compression.from_config(cfg.compression)
    assert (c.uplink, c.downlink, c.bits, c.topk_fraction) == ("qsgd", "fp16", 4, 0.01)
    assert isinstance(c.codec(), QSGD) and c.codec().levels == 15
    assert not Compression.from_config(from_dict({}).compression).enabled


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"compression": {"uplink": "zip"}}, "compression.uplink = 'zip' is not allowed"),
        ({"compression": {"downlink": "qsgd"}}, "compression.downlink = 'qsgd' is not allowed"),
        ({"compression": {"bits": 0}}, "compression.bits must be > 0"),
        ({"compression": {"bits": 17}}, "between 1 and 16"),
        ({"compression": {"topk_fraction": 0}}, "compression.topk_fraction must be > 0"),
        ({"compression": {"topk_fraction": 2}}, "between 0 and 1"),
        ({"compression": {"uplink": "topk"}, "secure_aggregation": {"enabled": True}},
         "SecAgg\\+ quantizes"),
        ({"compression": {"uplink": "fp16"},
          "privacy": {"mode": "central", "clip_on": "client"}}, "client-side clipping"),
    ],
)  # fmt: skip
def test_bad_compression_config_is_named(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict(raw)


def test_bad_codec_settings() -> None:
    with pytest.raises(ConfigError, match="one of none, fp16"):
        make_codec("gzip")
    with pytest.raises(ConfigError, match="bits must be between 1 and 16"):
        make_codec("qsgd", bits=20)
    with pytest.raises(ConfigError, match=r"fraction must be in \(0, 1\]"):
        CompressingClient(MeanClientFn(), "topk", topk_fraction=0.0)
