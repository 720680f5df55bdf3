"""Update compression: codecs with a client half (``encode``) and a server half (``decode``).

The uplink carries the client's update ``Δ = w_k − w`` (float64, over the model's
floating-point arrays) encoded as a *payload*: a list of NumPy arrays that
``pollinate.serde`` sends as they are, so the bytes on the wire are the payload's serialized
size. Non-float model arrays (integer counters, boolean masks) travel unencoded after the
payload. The codecs:

- ``none``: Δ as it is (float64);
- ``fp16``: Δ rounded to IEEE half precision (unit roundoff 2^-11; |Δ_i| > 65504 becomes
  inf, and the server's update check rejects it);
- ``bf16``: Δ rounded to float32, then to bfloat16 (round to nearest even), sent as the
  uint16 upper halves of the float32 bit patterns (relative error <= 2^-8 + 2^-24);
- ``qsgd``: QSGD stochastic quantization (Alistarh, Grubic, Li, Tomioka & Vojnovic 2017,
  arXiv:1610.02132), unbiased, fixed-width (no Elias coding);
- ``topk``: top-k sparsification with error feedback (Stich, Cordonnier & Jaggi 2018,
  arXiv:1809.07599; Karimireddy, Rebjock, Stich & Jaggi 2019, arXiv:1901.09847).

The downlink (``encode_model`` / ``decode_model``) carries the global model itself, in
float16 or bfloat16; ``qsgd`` and ``topk`` are refused there: quantizing or sparsifying the
model (not a change of it) destroys it, and encoding the change since the previous global
model would need every client to hold that model, which sampled clients in a cross-device
simulation do not (most were last sampled many rounds ago, or never).

Where it runs: ``CompressingClient`` wraps a client (or ``client_fn``) and encodes after
training; ``decode_update`` turns a payload back into model arrays ``w + Δ̂`` in the model's
dtypes on the server, before the update check and aggregation. ``Compression`` bundles the
settings of a run's ``[compression]`` section.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pollinate.client import Client, ClientContext, ClientFn, is_client
from pollinate.errors import ConfigError, UpdateRejected
from pollinate.types import Arrays, Config, EvaluateRes, TrainRes

log = logging.getLogger("pollinate")

CODECS = ("none", "fp16", "bf16", "qsgd", "topk")
DOWNLINK_CODECS = ("none", "fp16", "bf16")
#: the train-metrics key naming the codec a client encoded its update with
METRIC = "compression"
#: the client-state key of top-k's error-feedback residual
RESIDUAL_KEY = "ef_residual"
_MAX_ELEMENTS = 2**31 - 1  # top-k indices are int32


def is_encoded(array: np.ndarray) -> bool:
    """Whether a model array is part of the compressed update (floating point)."""
    return bool(array.dtype.kind == "f")


def _check(payload: Sequence[Any], count: int, name: str) -> None:
    if len(payload) != count:
        raise UpdateRejected(f"{name} payload has {len(payload)} arrays, expected {count}")
    for i, a in enumerate(payload):
        if not isinstance(a, np.ndarray):
            raise UpdateRejected(f"{name} payload item {i} is {type(a).__name__}, not an array")


def _expect(a: np.ndarray, dtype: Any, shape: tuple[int, ...], what: str) -> None:
    if a.dtype != np.dtype(dtype) or a.shape != shape:
        raise UpdateRejected(
            f"{what} is {a.dtype}{list(a.shape)}, expected {np.dtype(dtype)}{list(shape)}"
        )


class Codec(ABC):
    """Encodes an update Δ (float64 Arrays) into a payload and decodes it back."""

    name = "codec"

    @abstractmethod
    def encode(self, delta: Arrays, rng: np.random.Generator, state: dict[str, Any]) -> Arrays:
        """The payload for ``delta`` (client side); may read and update the client's
        ``state`` (top-k's residual)."""

    @abstractmethod
    def decode(self, payload: Arrays, template: Arrays) -> Arrays:
        """Δ̂ in float64, shaped like ``template`` (server side); ``UpdateRejected`` for a
        payload this codec did not make for that template."""


class Identity(Codec):
    """No compression: the payload is Δ in float64."""

    name = "none"

    def encode(self, delta: Arrays, rng: np.random.Generator, state: dict[str, Any]) -> Arrays:
        return [np.asarray(d, dtype=np.float64) for d in delta]

    def decode(self, payload: Arrays, template: Arrays) -> Arrays:
        _check(payload, len(template), self.name)
        for i, (p, t) in enumerate(zip(payload, template)):
            _expect(p, np.float64, t.shape, f"array {i}")
        return [np.array(p, dtype=np.float64) for p in payload]


class Float16(Codec):
    """Δ rounded to float16: ``|Δ̂_i − Δ_i| <= 2^-11 |Δ_i|`` in the normal range
    (|Δ_i| >= 2^-14), ``<= 2^-25`` below it."""

    name = "fp16"

    def encode(self, delta: Arrays, rng: np.random.Generator, state: dict[str, Any]) -> Arrays:
        with np.errstate(over="ignore"):
            return [np.asarray(d).astype(np.float16) for d in delta]

    def decode(self, payload: Arrays, template: Arrays) -> Arrays:
        _check(payload, len(template), self.name)
        for i, (p, t) in enumerate(zip(payload, template)):
            _expect(p, np.float16, t.shape, f"array {i}")
        return [p.astype(np.float64) for p in payload]


def to_bfloat16(values: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of ``values``: rounded to float32, then to the upper 16
    bits with round to nearest, ties to even; NaN stays NaN."""
    with np.errstate(over="ignore", invalid="ignore"):
        f32 = np.ascontiguousarray(values, dtype=np.float32)
    bits = f32.view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    out = rounded.astype(np.uint16)
    out[np.isnan(f32)] = 0x7FC0
    return out


def from_bfloat16(bits: np.ndarray, dtype: Any = np.float64) -> np.ndarray:
    """Values of bfloat16 bit patterns (uint16), in ``dtype`` (exact: bfloat16 ⊂ float32)."""
    f32 = (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return f32.astype(dtype)


class BFloat16(Codec):
    """Δ rounded to bfloat16, sent as uint16: ``|Δ̂_i − Δ_i| <= (2^-8 + 2^-24) |Δ_i|`` for
    |Δ_i| >= 2^-126 (float32's normal range)."""

    name = "bf16"

    def encode(self, delta: Arrays, rng: np.random.Generator, state: dict[str, Any]) -> Arrays:
        return [to_bfloat16(np.asarray(d)) for d in delta]

    def decode(self, payload: Arrays, template: Arrays) -> Arrays:
        _check(payload, len(template), self.name)
        for i, (p, t) in enumerate(zip(payload, template)):
            _expect(p, np.uint16, t.shape, f"array {i}")
        return [from_bfloat16(p) for p in payload]


def pack_bits(levels: np.ndarray, bits: int) -> np.ndarray:
    """Non-negative integers < 2^bits (bits <= 16), each written as ``bits`` bits, most
    significant first, packed into uint8."""
    wide = levels.astype(">u2").view(np.uint8).reshape(-1, 2)
    return np.packbits(np.unpackbits(wide, axis=1)[:, 16 - bits :])


def unpack_bits(packed: np.ndarray, count: int, bits: int) -> np.ndarray:
    """The ``count`` integers ``pack_bits`` packed, as uint16."""
    stream = np.unpackbits(packed, count=count * bits).reshape(count, bits)
    wide = np.zeros((count, 16), dtype=np.uint8)
    wide[:, 16 - bits :] = stream
    return np.packbits(wide, axis=1).view(">u2").reshape(count).astype(np.uint16)


class QSGD(Codec):
    """QSGD stochastic quantization (Alistarh et al. 2017, arXiv:1610.02132), per bucket.

    Each float array is flattened and cut into buckets of ``bucket_size`` coordinates (the
    last one shorter). For a bucket ``v`` with ``s = 2^bits − 1`` levels and
    ``n = ‖v‖₂`` rounded up to float32::

        r_i = s |v_i| / n ∈ [0, s],   ℓ_i = ⌊r_i⌋ + Bernoulli(r_i − ⌊r_i⌋),
        Q(v)_i = n · sign(v_i) · ℓ_i / s

    so ``E[ℓ_i] = r_i`` and ``E[Q(v)] = v`` (unbiased), with variance
    ``E‖Q(v) − v‖² <= min(d/s², √d/s) ‖v‖²`` for a bucket of ``d`` (the paper's Lemma 3.1),
    and ``|Q(v)_i − v_i| < n/s`` always. Payload per array: the bucket norms (float32), the
    signs (1 bit per coordinate, packed) and the levels (``bits`` bits per coordinate,
    packed): about ``(bits + 1)/8`` bytes per coordinate plus 4 per bucket. The fixed-width
    variant of the paper: its Elias coding of the levels is not done.
    """

    name = "qsgd"

    def __init__(self, bits: int = 8, bucket_size: int = 512) -> None:
        if not 1 <= bits <= 16:
            raise ConfigError(f"qsgd bits must be between 1 and 16, got {bits}")
        if bucket_size < 1:
            raise ConfigError(f"qsgd bucket_size must be >= 1, got {bucket_size}")
        self.bits = int(bits)
        self.levels = 2**self.bits - 1
        self.bucket_size = int(bucket_size)

    def _buckets(self, size: int) -> int:
        return -(-size // self.bucket_size)

    def _chunks(self, size: int) -> Iterator[tuple[int, int]]:
        """(start, stop) of the pieces an array is quantized in: whole buckets and whole
        bytes of packed bits, about 2^18 coordinates each, so the float64 temporaries stay
        a few MB whatever the model's size."""
        unit = self.bucket_size * 8 // math.gcd(self.bucket_size, 8)
        step = unit * max(1, (1 << 18) // unit)
        for start in range(0, size, step):
            yield start, min(size, start + step)

    def encode(self, delta: Arrays, rng: np.random.Generator, state: dict[str, Any]) -> Arrays:
        payload: Arrays = []
        b = self.bucket_size
        for d in delta:
            v = np.asarray(d, dtype=np.float64).reshape(-1)
            norms = np.empty(self._buckets(v.size), dtype=np.float32)
            packed = []
            for start, stop in self._chunks(v.size):
                part = v[start:stop]
                nb = self._buckets(part.size)
                padded = np.zeros(nb * b)
                padded[: part.size] = part
                exact = np.sqrt(np.einsum("ij,ij->i", padded.reshape(nb, b), padded.reshape(nb, b)))
                with np.errstate(over="ignore"):
                    n32 = exact.astype(np.float32)
                low = n32.astype(np.float64) < exact
                n32[low] = np.nextafter(n32[low], np.float32(np.inf))  # round up: r_i <= s
                norms[start // b : start // b + nb] = n32
                scale = np.repeat(n32.astype(np.float64), b)[: part.size]
                with np.errstate(divide="ignore", invalid="ignore"):
                    r = np.where(scale > 0, np.abs(part) / scale * self.levels, 0.0)
                np.minimum(r, self.levels, out=r)
                floor = np.floor(r)
                level = floor + (rng.random(part.size) < (r - floor))
                packed.append(pack_bits(level.astype(np.uint16), self.bits))
            levels = np.concatenate(packed) if packed else np.zeros(0, np.uint8)
            payload += [norms, np.packbits(v < 0), levels]
        return payload

    def decode(self, payload: Arrays, template: Arrays) -> Arrays:
        _check(payload, 3 * len(template), self.name)
        out: Arrays = []
        b, bits = self.bucket_size, self.bits
        for i, t in enumerate(template):
            norms, signs, packed = payload[3 * i : 3 * i + 3]
            size = int(t.size)
            _expect(norms, np.float32, (self._buckets(size),), f"array {i}'s norms")
            _expect(signs, np.uint8, (-(-size // 8),), f"array {i}'s signs")
            _expect(packed, np.uint8, (-(-size * bits // 8),), f"array {i}'s levels")
            if not (np.isfinite(norms).all() and (norms >= 0).all()):
                raise UpdateRejected(f"array {i}'s norms are negative or not finite")
            flat = np.empty(size)
            for start, stop in self._chunks(size):
                n = stop - start
                level = unpack_bits(packed[start * bits // 8 :], n, bits).astype(np.float64)
                sign = 1.0 - 2.0 * np.unpackbits(signs[start // 8 :], count=n)
                scale = np.repeat(norms[start // b : -(-stop // b)].astype(np.float64), b)[:n]
                flat[start:stop] = scale * sign * level / self.levels
            out.append(flat.reshape(t.shape))
        return out


class TopK(Codec):
    """Top-k sparsification with error feedback (Stich, Cordonnier & Jaggi 2018,
    arXiv:1809.07599; Karimireddy et al. 2019, arXiv:1901.09847).

    Over the whole update (every float array flattened and concatenated, ``d``
    coordinates) with the client's residual ``e`` (zero at first)::

        a = Δ + e,   S = the k = min(d, ⌈fraction · d⌉) indices of the largest |a_i|,
        send (S ascending as int32, float32(a_S)),   e' = a − sent

    ``e'`` is kept in the client's state under ``ef_residual`` (one float32 vector), so what
    was not sent this round (including the float32 rounding of what was) is carried into the
    next one. A residual of the wrong length (the model changed) starts again from zero.
    Exactly ``k`` values are sent: ``8k`` bytes in all.
    """

    name = "topk"

    def __init__(self, fraction: float = 0.01, error_feedback: bool = True) -> None:
        if not 0 < fraction <= 1:
            raise ConfigError(f"topk fraction must be in (0, 1], got {fraction}")
        self.fraction = float(fraction)
        self.error_feedback = error_feedback

    def k(self, size: int) -> int:
        """How many values an update of ``size`` coordinates sends."""
        return min(size, max(1, math.ceil(self.fraction * size - 1e-9)))

    def encode(self, delta: Arrays, rng: np.random.Generator, state: dict[str, Any]) -> Arrays:
        flat = [np.asarray(d, dtype=np.float64).reshape(-1) for d in delta]
        acc = np.concatenate(flat) if flat else np.zeros(0)
        size = acc.size
        if size > _MAX_ELEMENTS:
            raise ValueError(f"top-k indices are int32: the update has {size} coordinates")
        residual = state.get(RESIDUAL_KEY) if self.error_feedback else None
        if residual is not None:
            if np.shape(residual) == (size,):
                acc += residual
            else:
                log.warning("top-k residual of %s does not fit %d: reset", np.shape(residual), size)
        if size == 0:
            return [np.zeros(0, np.int32), np.zeros(0, np.float32)]
        k = self.k(size)
        index = np.sort(np.argpartition(np.abs(acc), size - k)[size - k :]).astype(np.int32)
        with np.errstate(over="ignore"):
            values = acc[index].astype(np.float32)
        if self.error_feedback:
            acc[index] -= values
            state[RESIDUAL_KEY] = acc.astype(np.float32)
        return [index, values]

    def decode(self, payload: Arrays, template: Arrays) -> Arrays:
        _check(payload, 2, self.name)
        index, values = payload
        size = sum(int(t.size) for t in template)
        k = self.k(size) if size else 0
        _expect(index, np.int32, (k,), "top-k indices")
        _expect(values, np.float32, (k,), "top-k values")
        if k and (index[0] < 0 or index[-1] >= size or (np.diff(index) <= 0).any()):
            raise UpdateRejected(f"top-k indices must be ascending, distinct and in [0, {size})")
        if not np.isfinite(values).all():
            raise UpdateRejected("top-k values hold NaN or infinite values")
        dense = np.zeros(size)
        dense[index] = values
        out: Arrays = []
        start = 0
        for t in template:
            out.append(dense[start : start + t.size].reshape(t.shape))
            start += t.size
        return out


def make_codec(
    name: str, bits: int = 8, topk_fraction: float = 0.01, bucket_size: int = 512
) -> Codec:
    """The codec called ``name`` (none | fp16 | bf16 | qsgd | topk)."""
    if name == "none":
        return Identity()
    if name == "fp16":
        return Float16()
    if name == "bf16":
        return BFloat16()
    if name == "qsgd":
        return QSGD(bits, bucket_size)
    if name == "topk":
        return TopK(topk_fraction)
    raise ConfigError(f"compression codec must be one of {', '.join(CODECS)}; got {name!r}")


# the uplink: the client half and the server half ------------------------------------------


def encode_update(
    new_arrays: Arrays,
    received: Arrays,
    codec: Codec,
    rng: np.random.Generator,
    state: dict[str, Any],
) -> Arrays:
    """The client half: ``codec.encode(w_k − w)`` over the float arrays, then the non-float
    arrays of ``new_arrays`` as they are. ``received`` is the model the client trained from."""
    if len(new_arrays) != len(received):
        raise ValueError(f"training returned {len(new_arrays)} arrays for {len(received)}")
    delta: Arrays = []
    raw: Arrays = []
    for i, (a, w) in enumerate(zip(new_arrays, received)):
        if np.shape(a) != w.shape:
            raise ValueError(f"training returned array {i} of shape {np.shape(a)}, not {w.shape}")
        if is_encoded(w):
            delta.append(np.subtract(a, w, dtype=np.float64))
        else:
            raw.append(np.asarray(a))
    return codec.encode(delta, rng, state) + raw


def decode_update(res_arrays: Arrays, global_arrays: Arrays, codec: Codec) -> Arrays:
    """The server half: the model ``w + Δ̂`` in ``global_arrays``' dtypes from a client's
    payload (the non-float arrays as the client sent them). ``UpdateRejected`` for a payload
    that ``codec`` did not make for this model; the update check still follows."""
    floats = [g for g in global_arrays if is_encoded(g)]
    n_raw = len(global_arrays) - len(floats)
    n_payload = len(res_arrays) - n_raw
    if n_payload < 0:
        raise UpdateRejected(
            f"a {codec.name} update has {len(res_arrays)} arrays, too few for this model"
        )
    deltas = iter(codec.decode(list(res_arrays[:n_payload]), floats))
    raw = iter(res_arrays[n_payload:])
    out: Arrays = []
    with np.errstate(over="ignore", invalid="ignore"):
        for g in global_arrays:
            if is_encoded(g):
                out.append((g.astype(np.float64) + next(deltas)).astype(g.dtype))
            else:
                out.append(next(raw))
    return out


# the downlink --------------------------------------------------------------------------

_RAW, _FP16, _BF16 = 0, 1, 2
_DOWN_CODES = {"fp16": _FP16, "bf16": _BF16}


def encode_model(arrays: Arrays, name: str) -> Arrays:
    """The global model for the downlink: its float16/32/64 arrays in ``name`` (fp16 | bf16),
    the others as they are, after a header (uint8, one row ``[code, itemsize]`` per array)
    that lets ``decode_model`` restore the dtypes. ``none`` returns ``arrays`` itself."""
    if name == "none":
        return arrays
    if name not in _DOWN_CODES:
        raise ConfigError(
            f"downlink compression must be one of {', '.join(DOWNLINK_CODECS)}; got {name!r} "
            "(qsgd and topk compress updates: applied to the model itself they destroy it, "
            "and the change since the previous model needs clients that hold that model)"
        )
    code = _DOWN_CODES[name]
    header = np.zeros((len(arrays), 2), dtype=np.uint8)
    body: Arrays = []
    for i, a in enumerate(arrays):
        if is_encoded(a) and a.dtype.itemsize in (2, 4, 8):
            header[i] = code, a.dtype.itemsize
            if code == _FP16:
                with np.errstate(over="ignore"):
                    body.append(a.astype(np.float16))
            else:
                body.append(to_bfloat16(a))
        else:
            body.append(a)
    return [header, *body]


def decode_model(payload: Arrays) -> Arrays:
    """The model ``encode_model`` encoded, in its original dtypes (rounded to fp16/bf16)."""
    if not payload or not isinstance(payload[0], np.ndarray):
        raise ValueError("not an encoded model: the header array is missing")
    header, body = payload[0], payload[1:]
    if header.dtype != np.uint8 or header.shape != (len(body), 2):
        raise ValueError(
            f"not an encoded model: header {header.dtype}{list(header.shape)} for "
            f"{len(body)} arrays (is the server compressing the downlink?)"
        )
    out: Arrays = []
    for i, ((code, itemsize), a) in enumerate(zip(header.tolist(), body)):
        if code == _RAW:
            out.append(a)
            continue
        want = np.float16 if code == _FP16 else np.uint16
        if code not in (_FP16, _BF16) or itemsize not in (2, 4, 8) or a.dtype != want:
            raise ValueError(f"encoded model array {i}: bad header row {[code, itemsize]}")
        dtype = np.dtype(f"f{itemsize}")
        out.append(a.astype(dtype) if code == _FP16 else from_bfloat16(a, dtype))
    return out


# the client wrapper --------------------------------------------------------------------


class CompressingClient:
    """A client whose update leaves compressed (and whose model may arrive compressed).

    Wraps a client, or a ``client_fn`` (giving a picklable ``client_fn``). ``train``
    decodes the model if ``downlink`` is not ``none``, trains, and returns
    ``encode_update(w_k, w)`` with ``uplink``'s codec as ``TrainRes.arrays``, with the metric
    ``compression = <uplink>``; ``uplink = "none"`` returns the trained model unchanged.
    The randomness (QSGD) is seeded by the task's ``seed`` config; top-k's residual lives
    in the client's state (``context.state["ef_residual"]``), kept between rounds.
    """

    def __init__(
        self,
        inner: Client | ClientFn,
        uplink: str = "none",
        *,
        downlink: str = "none",
        bits: int = 8,
        topk_fraction: float = 0.01,
        bucket_size: int = 512,
        context: ClientContext | None = None,
    ) -> None:
        make_codec(uplink, bits, topk_fraction, bucket_size)  # refuse bad settings now
        if downlink not in DOWNLINK_CODECS:
            encode_model([], downlink)  # raises, with the explanation
        self.inner = inner
        self.uplink, self.downlink = uplink, downlink
        self.bits, self.topk_fraction, self.bucket_size = bits, topk_fraction, bucket_size
        self.context = context
        self._state: dict[str, Any] = {}  # a wrapped client object's state (no context)

    def __call__(self, context: ClientContext) -> CompressingClient:
        if is_client(self.inner) or not callable(self.inner):
            raise TypeError("this CompressingClient wraps a client, not a client_fn")
        return CompressingClient(
            self.inner(context),
            self.uplink,
            downlink=self.downlink,
            bits=self.bits,
            topk_fraction=self.topk_fraction,
            bucket_size=self.bucket_size,
            context=context,
        )

    def _client(self) -> Client:
        if not is_client(self.inner) or not isinstance(self.inner, Client):
            raise TypeError("this CompressingClient wraps a client_fn: call it with a context")
        return self.inner

    def _model(self, arrays: Arrays) -> Arrays:
        return arrays if self.downlink == "none" else decode_model(arrays)

    def train(self, arrays: Arrays, config: Config) -> TrainRes:
        model = self._model(arrays)
        res = self._client().train(model, config)
        metrics = {**res.metrics, METRIC: self.uplink}
        if self.uplink == "none":
            return TrainRes(res.arrays, res.num_examples, metrics)
        codec = make_codec(self.uplink, self.bits, self.topk_fraction, self.bucket_size)
        seed = config.get("seed")  # the task's seed (simulation); else fresh entropy
        seeded = isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0
        rng = np.random.default_rng([int(seed), 0xC0DE] if seeded else None)  # type: ignore[arg-type]
        state = self.context.state if self.context is not None else self._state
        payload = encode_update(list(res.arrays), model, codec, rng, state)
        return TrainRes(payload, res.num_examples, metrics)

    def evaluate(self, arrays: Arrays, config: Config) -> EvaluateRes:
        return self._client().evaluate(self._model(arrays), config)


@dataclass(frozen=True)
class Compression:
    """A run's ``[compression]`` settings, and the calls that apply them on each side."""

    uplink: str = "none"
    downlink: str = "none"
    bits: int = 8
    topk_fraction: float = 0.01
    bucket_size: int = 512

    def __post_init__(self) -> None:
        make_codec(self.uplink, self.bits, self.topk_fraction, self.bucket_size)
        if self.downlink not in DOWNLINK_CODECS:
            encode_model([], self.downlink)  # raises, with the explanation

    @classmethod
    def from_config(cls, section: Any) -> Compression:
        """From a ``[compression]`` config section (``pollinate.config.CompressionSection``)."""
        return cls(section.uplink, section.downlink, section.bits, section.topk_fraction)

    @property
    def enabled(self) -> bool:
        return self.uplink != "none" or self.downlink != "none"

    def codec(self) -> Codec:
        """The uplink codec."""
        return make_codec(self.uplink, self.bits, self.topk_fraction, self.bucket_size)

    def client(self, inner: Client | ClientFn) -> CompressingClient:
        """``inner`` wrapped to decode the downlink and encode the uplink."""
        return CompressingClient(
            inner,
            self.uplink,
            downlink=self.downlink,
            bits=self.bits,
            topk_fraction=self.topk_fraction,
            bucket_size=self.bucket_size,
        )

    def encode_model(self, arrays: Arrays) -> Arrays:
        """The global model as the server sends it (unchanged when downlink is none)."""
        return encode_model(arrays, self.downlink)

    def decode_update(self, res_arrays: Arrays, global_arrays: Arrays) -> Arrays:
        """A client's model ``w + Δ̂`` from its payload; with ``uplink = "none"`` the client
        (``CompressingClient``) sent its model itself, returned unchanged."""
        if self.uplink == "none":
            return list(res_arrays)
        return decode_update(res_arrays, global_arrays, self.codec())
