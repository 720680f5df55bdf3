"""Client profiles and the virtual clock: hand-computed durations, seeded draws, failures."""

from __future__ import annotations

import json
import math
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pollinate import serde
from pollinate.client import MemoryStateStore
from pollinate.compression import CompressingClient, decode_update, make_codec
from pollinate.config import from_dict
from pollinate.errors import ConfigError
from pollinate.server import run
from pollinate.simulation.backends.sequential import SequentialBackend
from pollinate.simulation.clock import ClockRecorder, VirtualClockExecutor, failure_kind
from pollinate.simulation.engine import SimulationExecutor
from pollinate.simulation.environment import Environment, tier_counts, uniforms
from pollinate.strategy.fedavg import FedAvg
from pollinate.types import Outcome, TrainIns, TrainRes
from tests.fakes import MeanClientFn, initial

TIERS = [
    {"share": 0.6, "speed": 1.0, "downlink_mbps": 50, "uplink_mbps": 10, "latency_ms": 30},
    {"share": 0.3, "speed": 0.5, "downlink_mbps": 10, "uplink_mbps": 2, "latency_ms": 80},
    {"share": 0.1, "speed": 0.1, "downlink_mbps": 2, "uplink_mbps": 1, "latency_ms": 300,
     "online": 0.9, "loss": 0.05, "name": "slow"},
]  # fmt: skip

#: serialized size of tests.fakes.initial() (and of MeanClient's results): a 64-byte header,
#: the (3, 4) float32 array at 64 (48 bytes, padded to 128), the (2,) int64 one at 128 (16,
#: padded to 192)
MODEL_BYTES = 192


def _trace(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "clients.csv"
    path.write_text(text, encoding="utf-8")
    return path


# profiles --------------------------------------------------------------------------------


def test_tiers_hold_exact_shares_and_the_same_seed_gives_the_same_environment() -> None:
    env = Environment.from_tiers(TIERS, 10, seed=3)
    assert env.describe() == {"tier0": 6, "tier1": 3, "slow": 1}
    again = Environment.from_tiers(TIERS, 10, seed=3)
    assert [env.tier_of(c) for c in range(10)] == [again.tier_of(c) for c in range(10)]
    orders = {
        tuple(Environment.from_tiers(TIERS, 10, seed=s).tier_of(c) for c in range(10))
        for s in range(6)
    }
    assert len(orders) > 1  # the seed decides who is where
    slow = next(c for c in range(10) if env.tier_of(c) == "slow")
    p = env.profile(slow)
    assert (p.speed, p.downlink_mbps, p.uplink_mbps, p.latency_ms) == (0.1, 2, 1, 300)
    assert (p.online, p.loss, p.corrupt) == (0.9, 0.05, 0.0)
    fast = env.profile(next(c for c in range(10) if env.tier_of(c) == "tier0"))
    assert (fast.online, fast.loss, fast.seconds_per_example) == (1.0, 0.0, 0.0)


def test_tier_counts_use_largest_remainders() -> None:
    assert tier_counts([0.6, 0.3, 0.1], 10).tolist() == [6, 3, 1]
    assert tier_counts([0.5, 0.25, 0.25], 7).tolist() == [3, 2, 2]  # 3.5, 1.75, 1.75
    assert tier_counts([0.5, 0.5], 3).tolist() == [2, 1]  # a tie goes to the earlier tier
    assert tier_counts([1 / 3] * 3, 100).tolist() == [34, 33, 33]


def test_a_million_clients_take_one_byte_each() -> None:
    tracemalloc.start()
    try:
        env = Environment.from_tiers(TIERS, 1_000_000, seed=1)
        ids = np.arange(999_000, 1_000_000)
        online = env.online(5, 0.0, ids)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3_000_000  # the int8 tier index (1 MB) and small temporaries
    assert env.row_of is not None and env.row_of.dtype == np.int8
    assert env.describe() == {"tier0": 600_000, "tier1": 300_000, "slow": 100_000}
    assert env.profile(999_999).client_id == 999_999
    slow = env.column("online", ids) < 1
    assert online[~slow].all() and not online[slow].all()
    with pytest.raises(ConfigError, match="outside"):
        env.profile(1_000_000)


def test_trace_rows_by_client_id_and_defaults(tmp_path: Path) -> None:
    path = _trace(
        tmp_path,
        "client_id,seconds_per_example,uplink_mbps,loss\n2,0.5,1,0\n0,0.25,inf,0.5\n1,1,4,1\n",
    )
    env = Environment.from_trace(path, 3)
    p0, p1, p2 = (env.profile(c) for c in range(3))
    assert (p0.seconds_per_example, p0.uplink_mbps, p0.loss) == (0.25, math.inf, 0.5)
    assert (p1.seconds_per_example, p1.uplink_mbps, p1.loss) == (1.0, 4.0, 1.0)
    assert (p2.seconds_per_example, p2.uplink_mbps, p2.loss) == (0.5, 1.0, 0.0)
    assert (p2.speed, p2.downlink_mbps, p2.online, p2.tier) == (1.0, math.inf, 1.0, "trace")
    assert Environment.from_trace(path, 2).num_clients == 2  # extra rows are ignored
    with pytest.raises(ConfigError, match="3 client rows, fewer than the 4"):
        Environment.from_trace(path, 4)


@pytest.mark.parametrize(
    "text, message",
    [
        ("speed,latncy_ms\n1,2\n", "unknown column .* 'latncy_ms' .*'latency_ms'"),
        ("speed\n1\n-2\n", r"client 1: speed must be > 0"),
        ("online\n0.5\n1.5\n", r"client 1: online is a probability"),
        ("on_s,off_s\n10,0\n", "needs both on_s and off_s"),
        ("speed\nfast\n", "not a CSV of numbers"),
        ("client_id,speed\n0,1\n0,1\n", "client_id must hold each of 0..1 once"),
    ],
)
def test_bad_traces_are_named(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Environment.from_trace(_trace(tmp_path, text), text.count("\n") - 1)


def test_environment_config_section(tmp_path: Path) -> None:
    cfg = from_dict({"environment": {"seed": 4, "tiers": TIERS, "deadline_s": 30}})
    env = Environment.from_config(cfg.environment, 20)
    assert env is not None and env.seed == 4
    assert env.describe() == {"tier0": 12, "tier1": 6, "slow": 2}
    assert cfg.environment.deadline_s == 30.0
    assert Environment.from_config(from_dict({}).environment, 20) is None
    path = _trace(tmp_path, "speed\n1\n0.5\n")
    cfg = from_dict({"environment": {"trace": str(path)}})
    env = Environment.from_config(cfg.environment, 2)
    assert env is not None and env.profile(1).speed == 0.5


@pytest.mark.parametrize(
    "section, message",
    [
        ({"tiers": [{"share": 1.0, "latency": 3}]},
         r"environment.tiers\[0\].*'latency' \(did you mean 'latency_ms'\?\)"),
        ({"tiers": [{"share": 0.5}, {"share": 0.5, "bandwidth": 3}]},
         r"key in environment.tiers\[1\] 'bandwidth'"),
        ({"tiers": [{"share": 0.5}, {"share": 0.4}]}, "shares sum to 0.9"),
        ({"tiers": [{"speed": 1}]}, r"environment.tiers\[0\] has no share"),
        ({"tiers": [{"share": 1, "loss": 2}]}, r"environment.tiers\[0\].loss is a probability"),
        ({"tiers": [{"share": 1, "uplink_mbps": 0}]}, r"tiers\[0\].uplink_mbps must be > 0"),
        ({"tiers": [{"share": 1, "speed": "fast"}]}, r"tiers\[0\].speed must be a number"),
        ({"tiers": [{"share": 1, "on_s": 5}]}, "needs both on_s and off_s"),
        ({"tiers": [1, 2]}, "environment.tiers must be a list of tables"),
        ({"tiers": [{"share": 1}], "trace": "x.csv"}, "both tiers and trace"),
        ({"deadline_s": -1}, "environment.deadline_s must be >= 0"),
    ],
)  # fmt: skip
def test_bad_environment_config_is_named(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict({"environment": section})


# seeded draws ----------------------------------------------------------------------------


def test_draws_depend_only_on_seed_round_and_client() -> None:
    tiers = [{"share": 1.0, "online": 0.5, "loss": 0.3, "corrupt": 0.2}]
    env = Environment.from_tiers(tiers, 100_000, seed=7)
    ids = np.arange(100_000)
    online = env.online(3, 0.0, ids)
    errors = env.transfers(3, "train", ids)
    again = Environment.from_tiers(tiers, 100_000, seed=7)
    np.testing.assert_array_equal(again.online(3, 0.0, ids), online)
    for name, drawn in again.transfers(3, "train", ids).items():
        np.testing.assert_array_equal(drawn, errors[name])
    some = np.array([99_999, 5, 42])  # any subset, in any order, gets the same draws
    np.testing.assert_array_equal(env.online(3, 0.0, some), online[some])
    lost_up = env.transfers(3, "train", some)["lost_up"]
    np.testing.assert_array_equal(lost_up, errors["lost_up"][some])
    # the rates are the profile's probabilities (binomial sd at 100k draws: about 0.0016)
    assert abs(online.mean() - 0.5) < 0.01
    assert abs(errors["lost_down"].mean() - 0.3) < 0.01
    assert abs(errors["corrupt_up"].mean() - 0.2) < 0.01
    # rounds, task kinds, purposes and seeds draw independently
    assert abs((online == env.online(4, 0.0, ids)).mean() - 0.5) < 0.01
    evaluate = env.transfers(3, "evaluate", ids)["lost_down"]
    assert abs((evaluate == errors["lost_down"]).mean() - (0.3**2 + 0.7**2)) < 0.01
    other = Environment.from_tiers(tiers, 100_000, seed=8).online(3, 0.0, ids)
    assert abs((other == online).mean() - 0.5) < 0.01


def test_uniforms_are_uniform() -> None:
    u = uniforms(0, (1, 2), np.arange(200_000))
    assert u.min() >= 0 and u.max() < 1
    counts = np.histogram(u, bins=10, range=(0, 1))[0]
    assert np.abs(counts - 20_000).max() < 700  # about 5 binomial sds


def test_on_off_cycles_follow_the_virtual_clock() -> None:
    env = Environment.from_tiers([{"share": 1.0, "on_s": 10, "off_s": 20}], 50, seed=2)
    ids = np.arange(50)
    phases = np.array([env.profile(c).phase_s for c in ids])
    assert (phases >= 0).all() and (phases < 30).all() and len(set(phases)) == 50
    for clock in (0.0, 7.5, 29.0, 1234.5):
        expected = np.mod(clock + phases, 30) < 10
        np.testing.assert_array_equal(env.online(1, clock, ids), expected)
    # the same client, the same round number: only the clock moves it
    shares = [env.online(1, float(t), ids).mean() for t in range(0, 300, 3)]
    assert abs(np.mean(shares) - 1 / 3) < 0.05


# the virtual clock -----------------------------------------------------------------------


def _clock(env: Environment, deadline: float | None, **kw: Any) -> VirtualClockExecutor:
    inner = SimulationExecutor(
        _started(SequentialBackend(), MeanClientFn(kw.pop("behaviour", {}))),
        state_store=kw.pop("store", MemoryStateStore()),
    )
    return VirtualClockExecutor(inner, env, deadline)


def _started(backend: SequentialBackend, client_fn: Any) -> SequentialBackend:
    backend.start(client_fn)
    return backend


def test_the_deadline_drops_exactly_the_clients_whose_simulated_duration_passes_it(
    tmp_path: Path,
) -> None:
    # MeanClient i trains on i + 1 examples; 2 epochs; sends and receives MODEL_BYTES
    mbps = MODEL_BYTES * 8 / 1e6  # one second per model at 1 "unit" of bandwidth
    rows = [  # latency_ms, downlink, uplink, seconds_per_example
        (100, mbps, 2 * mbps, 1.0),  # 0.1 + 1 + 1·2·1 + 0.5 = 3.6
        (0, mbps, mbps, 1.0),  # 0 + 1 + 2·2·1 + 1 = 6.0
        (0, mbps, mbps, 0.75),  # 0 + 1 + 3·2·0.75 + 1 = 6.5 (on the deadline: made it)
        (0, mbps, mbps, 1.0),  # 0 + 1 + 4·2·1 + 1 = 10.0
        (0, mbps / 10, mbps, 0.0),  # download alone 10 s: never runs
        (500, mbps, mbps / 4, 0.1),  # 0.5 + 1 + 6·2·0.1 + 4 = 6.7
    ]
    text = "latency_ms,downlink_mbps,uplink_mbps,seconds_per_example\n"
    text += "".join(f"{a},{b!r},{c!r},{d}\n" for a, b, c, d in rows)
    env = Environment.from_trace(_trace(tmp_path, text), 6)
    store = MemoryStateStore()
    clock = _clock(env, 6.5, store=store)
    plan = [(c, TrainIns(initial(), {"epochs": 2})) for c in range(6)]
    outcomes = {o.client_id: o for o in clock.submit(1, "train", plan, 600)}

    assert sorted(c for c, o in outcomes.items() if o.ok) == [0, 1, 2]
    for cid, expected in [(3, 10.0), (5, 6.7)]:
        why = f"timeout: simulated duration {expected:.6g} s > deadline 6.5 s"
        assert outcomes[cid].error == why
        assert outcomes[cid].result is None
    assert outcomes[4].error is not None and outcomes[4].error.startswith(
        "timeout: simulated duration of at least 10 s (latency and download alone)"
    )
    assert store.get(3) == {"rounds": 1}  # client 3 trained, too late
    assert store.get(4) == {}  # client 4 never ran

    stats = clock.round_stats(1)
    durations = {int(c): s["train"]["duration_s"] for c, s in stats["clients"].items()}
    assert durations == pytest.approx({0: 3.6, 1: 6.0, 2: 6.5, 3: 10.0, 4: 10.0, 5: 6.7})
    assert {s["train"]["tier"] for s in stats["clients"].values()} == {"trace"}
    made = {int(c): s["train"]["made_deadline"] for c, s in stats["clients"].items()}
    assert made == {0: True, 1: True, 2: True, 3: False, 4: False, 5: False}
    assert stats["simulated_time_s"] == 6.5  # someone missed it: the whole deadline
    assert stats["train"]["timeouts"] == 3 and stats["deadline_s"] == 6.5
    assert stats["bytes_down"] == 6 * MODEL_BYTES  # the broadcast, once per client
    assert stats["bytes_up"] == 5 * MODEL_BYTES  # every client that ran uploaded
    assert clock.clock_s == 6.5

    # a deadline all meet: the round lasts until the slowest answer
    clock = _clock(env, 11.0)
    assert all(o.ok for o in clock.submit(1, "train", plan[:4], 600))
    assert clock.round_stats(1)["simulated_time_s"] == pytest.approx(10.0)
    assert clock.round_stats(1)["clock_s"] == pytest.approx(10.0)


def test_speed_scales_measured_seconds_and_no_deadline_means_the_strategy_timeout() -> None:
    env = Environment.from_tiers([{"share": 1.0, "speed": 0.25}], 3)
    clock = _clock(env, None)  # the submit's timeout_s is the simulated deadline
    plan = [(c, TrainIns(initial(), {})) for c in range(3)]
    outcomes = list(clock.submit(1, "train", plan, 600))
    stats = clock.round_stats(1)
    for o in outcomes:
        assert o.ok
        duration = stats["clients"][str(o.client_id)]["train"]["duration_s"]
        assert duration == pytest.approx(o.seconds / 0.25, abs=1e-6)
    assert stats["deadline_s"] == 600
    # a deadline shorter than any compute: every client that ran is late
    clock = _clock(env, 1e-12)
    late = list(clock.submit(1, "train", plan, 600))
    assert all(failure_kind(o.error or "") == "timeout" for o in late)


def _fedavg() -> FedAvg:
    return FedAvg(min_train_clients=1, min_available_clients=1, fraction_evaluate=0.0)


def test_offline_lost_and_corrupted_clients_fail_and_are_never_averaged_in() -> None:
    # half of all transfers are lost and a third corrupted: pick, from the environment's own
    # seeded draws, one client of each fate in round 1
    n = 60
    tiers = [{"share": 1.0, "online": 0.8, "loss": 0.3, "corrupt": 0.3}]
    env = Environment.from_tiers(tiers, n, seed=5)
    ids = np.arange(n)
    up = env.online(1, 0.0, ids)
    e = env.transfers(1, "train", ids)
    fates = {
        "offline": ~up,
        "lost_down": up & e["lost_down"],
        "corrupt_down": up & ~e["lost_down"] & e["corrupt_down"],
        "lost_up": up & ~e["lost_down"] & ~e["corrupt_down"] & e["lost_up"],
        "corrupt_up": up & ~(e["lost_down"] | e["corrupt_down"] | e["lost_up"]) & e["corrupt_up"],
        "ok": up & ~(e["lost_down"] | e["corrupt_down"] | e["lost_up"] | e["corrupt_up"]),
    }
    picked = {fate: int(np.flatnonzero(mask)[0]) for fate, mask in fates.items()}
    store = MemoryStateStore()
    clock = _clock(env, 100.0, store=store)
    result = run(_fedavg(), clock, sorted(picked.values()), initial(), 1)

    # only the one client that got through is averaged in: the model is its value
    np.testing.assert_allclose(result.arrays[0], np.full((3, 4), picked["ok"]))
    record = result.history.rounds[0]
    assert record["train"]["clients"] == 1 and record["train"]["failures"] == 5
    reasons = {f["client_id"]: f["reason"] for f in record["failures"]}
    assert failure_kind(reasons[picked["offline"]]) == "offline"
    assert reasons[picked["lost_down"]] == "lost: the model download was lost"
    assert reasons[picked["lost_up"]] == "lost: the upload was lost"
    assert failure_kind(reasons[picked["corrupt_down"]]) == "corrupted"
    assert reasons[picked["corrupt_up"]].startswith("corrupted: the upload failed its checksum")
    # who ran: the upload failures trained (their state moved on), the others never started
    ran = {c for c in picked.values() if store.get(c)}
    assert ran == {picked["lost_up"], picked["corrupt_up"], picked["ok"]}

    stats = clock.round_stats(1)
    status = {int(c): s["train"]["status"] for c, s in stats["clients"].items()}
    assert status == {
        picked["offline"]: "offline",
        picked["lost_down"]: "lost",
        picked["corrupt_down"]: "corrupted",
        picked["lost_up"]: "lost",
        picked["corrupt_up"]: "corrupted",
        picked["ok"]: "ok",
    }
    assert (stats["train"]["offline"], stats["train"]["lost"], stats["train"]["corrupted"]) == (
        1,
        2,
        2,
    )
    assert stats["simulated_time_s"] == 100.0  # a lost answer: the server waited it out
    assert stats["bytes_down"] == 5 * MODEL_BYTES  # everyone online was sent the model
    assert stats["bytes_up"] == 3 * MODEL_BYTES  # the three that ran uploaded


def test_rounds_on_the_clock_add_up_and_bytes_are_serde_sizes() -> None:
    tier = {"share": 1.0, "downlink_mbps": 1.0, "uplink_mbps": 0.5, "latency_ms": 10}
    env = Environment.from_tiers([{**tier, "seconds_per_example": 0.01}], 4)
    clock = _clock(env, 60.0)
    strategy = FedAvg(
        min_train_clients=1,
        min_evaluate_clients=1,
        min_available_clients=1,
        train_config={"epochs": 5},
    )
    result = run(strategy, clock, range(4), initial(), 2)
    model = len(serde.dumps(result.arrays))
    assert model == serde.payload_size(result.arrays) == MODEL_BYTES
    # train: latency, download, 4 examples (client 3) · 5 epochs · 0.01 s, upload at 0.5 Mbit/s
    train_s = 0.01 + model * 8 / 1e6 + 4 * 5 * 0.01 + model * 8 / 0.5e6
    evaluate_s = 0.01 + model * 8 / 1e6 + 4 * 0.01  # one pass over 4 examples, no upload
    clock_s = 0.0
    for r in (1, 2):
        stats = clock.round_stats(r)
        train, evaluate = stats["train"], stats["evaluate"]
        assert train["bytes_down"] == 4 * model and train["bytes_up"] == 4 * model
        assert evaluate["bytes_down"] == 4 * model and evaluate["bytes_up"] == 0
        assert stats["bytes_down"] == 8 * model and stats["bytes_up"] == 4 * model
        assert train["simulated_time_s"] == pytest.approx(train_s, abs=1e-6)
        assert evaluate["simulated_time_s"] == pytest.approx(evaluate_s, abs=1e-6)
        assert stats["simulated_time_s"] == pytest.approx(train_s + evaluate_s, abs=1e-5)
        clock_s += train_s + evaluate_s
        assert stats["clock_s"] == pytest.approx(clock_s, abs=1e-5)
    assert clock.clock_s == pytest.approx(clock_s)
    assert clock.round_stats(7) == {}


@pytest.mark.parametrize(
    "arrays",
    [
        [],
        [np.zeros(0, np.float32)],
        [np.zeros((3, 0, 2)), np.ones(1, np.uint8)],
        [np.arange(n, dtype=np.float16) for n in range(40)],
        [np.zeros((7, 9), np.complex64), np.array(True), np.arange(100, dtype=">i8")],
    ],
)
def test_payload_size_is_the_serialized_length(arrays: list[np.ndarray]) -> None:
    assert serde.payload_size(arrays) == len(serde.dumps(arrays))


def test_compressed_uploads_are_measured_as_sent() -> None:
    env = Environment.from_tiers([{"share": 1.0, "uplink_mbps": 1.0}], 3)
    client_fn = CompressingClient(MeanClientFn(), "topk", topk_fraction=0.01)
    clock = VirtualClockExecutor(
        SimulationExecutor(_started(SequentialBackend(), client_fn)), env, 60.0
    )
    arrays = [np.zeros((50, 40), np.float32), np.zeros(2, np.int64)]
    plan = [(c, TrainIns(arrays, {})) for c in range(3)]
    outcomes = list(clock.submit(1, "train", plan, 60))
    stats = clock.round_stats(1)
    full = serde.payload_size(arrays)
    codec = make_codec("topk", topk_fraction=0.01)
    for o in outcomes:
        assert isinstance(o.result, TrainRes)
        payload = o.result.arrays
        timing = stats["clients"][str(o.client_id)]["train"]
        assert timing["bytes_down"] == full
        assert timing["bytes_up"] == len(serde.dumps(payload)) < full / 10
        decoded = decode_update(payload, arrays, codec)  # 20 values of 2000 sent
        assert np.count_nonzero(decoded[0]) == (20 if o.client_id else 0)


def test_failure_kinds() -> None:
    assert failure_kind("offline: client 3 is unreachable") == "offline"
    assert failure_kind("lost: the upload was lost") == "lost"
    assert failure_kind("corrupted: the upload failed its checksum") == "corrupted"
    assert failure_kind("timeout: simulated duration 3 s > deadline 2 s") == "timeout"
    assert failure_kind("RuntimeError: boom") == "error"


def test_a_client_error_passes_through_with_its_timing() -> None:
    env = Environment.from_tiers([{"share": 1.0, "latency_ms": 1000}], 2)
    clock = _clock(env, 5.0, behaviour={1: "raise"})
    plan = [(c, TrainIns(initial(), {})) for c in range(2)]
    outcomes = {o.client_id: o for o in clock.submit(1, "train", plan, 60)}
    assert outcomes[1].error == "RuntimeError: client 1 exploded"
    timing = clock.round_stats(1)["clients"]["1"]["train"]
    assert timing["status"] == "error" and timing["made_deadline"]
    assert timing["duration_s"] >= 1.0 and timing["bytes_up"] == 0
    assert isinstance(outcomes[0], Outcome) and outcomes[0].ok


def _conditions_run(seed: int) -> dict[str, Any]:
    tiers = [
        {"share": 0.5, "seconds_per_example": 0.5, "uplink_mbps": 0.01, "online": 0.7},
        {"share": 0.5, "seconds_per_example": 2.0, "loss": 0.2, "corrupt": 0.1},
    ]
    env = Environment.from_tiers(tiers, 12, seed=seed)
    clock = _clock(env, 20.0)
    strategy = FedAvg(min_train_clients=1, min_available_clients=1, min_evaluate_clients=1)
    result = run(strategy, clock, range(12), initial(), 3, callbacks=[ClockRecorder(clock)])
    history = json.loads(json.dumps(result.history.to_dict()))  # the record is JSON as is
    for record in history["rounds"]:
        del record["wall_s"], record["train"]["metrics"]["worker_pid"]
        for client in record["clients"].values():
            client.get("train", {}).pop("worker_pid", None)
    return history


def test_the_same_seed_replays_the_same_conditions_in_the_history() -> None:
    first, again, other = _conditions_run(1), _conditions_run(1), _conditions_run(2)
    assert first == again
    assert first != other
    records = first["rounds"]
    assert [r["environment"]["clock_s"] for r in records] == sorted(
        r["environment"]["clock_s"] for r in records
    )
    for record in records:
        env = record["environment"]
        statuses = [c["train"]["status"] for c in env["clients"].values() if "train" in c]
        tiers = {c["train"]["tier"] for c in env["clients"].values() if "train" in c}
        assert tiers == {"tier0", "tier1"}
        assert len(statuses) == 12
        assert record["train"]["clients"] == statuses.count("ok")
        assert record["train"]["failures"] == 12 - statuses.count("ok")
    fates = {c["train"]["status"] for r in records for c in r["environment"]["clients"].values()}
    # the 2 s tier's clients with over 10 examples need over 20 s: they miss the deadline
    assert fates == {"ok", "offline", "lost", "corrupted", "timeout"}


def test_a_run_config_with_an_environment_and_compression_runs_end_to_end(tmp_path) -> None:
    from pollinate import config as run_config
    from pollinate.experiment import run_experiment

    toml = tmp_path / "run.toml"
    fast = "{share = 0.5, seconds_per_example = 0.001, downlink_mbps = 50, uplink_mbps = 10}"
    slow = "{share = 0.5, seconds_per_example = 0.5, downlink_mbps = 1, uplink_mbps = 0.5}"
    toml.write_text(
        f"""
[run]
rounds = 2
output = "{tmp_path / "run"}"
deterministic = true
[data]
num_clients = 6
[train]
epochs = 1
[simulation]
backend = "sequential"
[strategy]
round_timeout_s = 30
[environment]
seed = 1
tiers = [{fast}, {slow}]
[compression]
uplink = "qsgd"
bits = 4
"""
    )
    result = run_experiment(run_config.load(toml), quiet=True)
    record = result.history.rounds[-1]
    env = record["environment"]
    assert env["bytes_up"] > 0 and env["simulated_time_s"] > 0
    slow = [c for c in env["clients"].values() if not c["train"]["made_deadline"]]
    assert record["train"]["timeouts"] == len(slow) > 0  # the slow tier misses 30 s
    assert record["train"]["clients"] == 6 - len(slow)
    assert all(
        c["train"]["compression"] == "qsgd" for c in record["clients"].values() if "train" in c
    )
