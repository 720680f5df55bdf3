"""SecAgg+: the server gets the exact (quantized) sum, single inputs look uniform, bad input is
refused with a clear message, and dropouts are survived up to what the threshold allows."""

from __future__ import annotations

import base64
import itertools
import pickle
from collections.abc import Collection

import numpy as np
import pytest
from scipy import stats

from pollinate.errors import ConfigError, PollinateError
from pollinate.privacy.accounting import PrivacyError
from pollinate.privacy.secagg import (
    PRIME,
    SecAggConfig,
    SecAggError,
    SecAggServer,
    client_keys,
    client_mask,
    client_shares,
    client_unmask,
    dequantize,
    neighbour_graph,
    prg,
    quantize,
    shamir_reconstruct,
    shamir_split,
)

TAG = b"test-run/round-1"


class Round:
    """One simulated round: a server and its clients, each stage run on demand."""

    def __init__(self, n: int, dim: int = 64, config: SecAggConfig | None = None, seed: int = 0):
        self.config = config or SecAggConfig()
        rng = np.random.default_rng(seed)
        self.ids = [3 * i + 1 for i in range(n)]  # not 0..n-1: ids are labels, not positions
        self.xs = {cid: rng.uniform(-1, 1, dim) for cid in self.ids}
        self.server = SecAggServer(self.config, self.ids, TAG, np.random.default_rng(seed + 1))
        self.states: dict[int, dict] = {}
        self.shared: list[int] = []

    def keys(self, skip: Collection[int] = ()) -> None:
        for cid in self.ids:
            if cid not in skip:
                self.states[cid], public = client_keys(TAG)
                self.server.add_keys(cid, public)

    def shares(self, skip: Collection[int] = ()) -> None:
        for cid in self.states:
            if cid not in skip:
                peers = self.server.neighbours_public(cid)
                sent = client_shares(self.states[cid], cid, peers, self.server.t)
                self.server.add_shares(cid, sent)
                self.shared.append(cid)

    def mask(self, skip: Collection[int] = ()) -> None:
        for cid in self.shared:
            if cid not in skip:
                received = self.server.shares_for(cid)
                y = client_mask(self.states[cid], cid, received, self.xs[cid], self.config)
                self.server.add_masked(cid, y)

    def unmask(self, skip: Collection[int] = ()) -> list[int]:
        survivors, dropped = self.server.unmask_request()
        for cid in survivors:
            if cid not in skip:
                revealed = client_unmask(self.states[cid], cid, survivors, dropped)
                self.server.add_reveal(cid, revealed)
        return survivors

    def run(self, no_keys=(), after_keys=(), after_shares=(), silent=()) -> np.ndarray:
        self.keys(skip=no_keys)
        self.shares(skip=after_keys)
        self.mask(skip=after_shares)
        self.unmask(skip=silent)
        return self.server.result()

    def expected(self) -> np.ndarray:
        c = self.config.clip_range
        return sum(np.clip(self.xs[cid], -c, c) for cid in self.server.survivors)

    def assert_exact(self, result: np.ndarray) -> None:
        bound = len(self.server.survivors) * self.config.quantum() / 2
        err = np.abs(result - self.expected()).max()
        assert err <= bound * (1 + 1e-9), (err, bound)


# --- the sum ------------------------------------------------------------------------------


def test_sum_of_10_clients_is_the_plain_sum_within_the_quantization_error():
    r = Round(10, dim=3000)
    r.assert_exact(r.run())
    assert r.server.survivors == r.ids
    assert (r.server.k, r.server.t) == (5, 3)


def test_sum_of_100_clients_with_a_sparse_graph():
    r = Round(100, dim=2000, config=SecAggConfig(neighbours=4, threshold=3))
    assert (r.server.k, r.server.t) == (4, 3)
    r.assert_exact(r.run())


def test_clipping_and_the_full_range_of_the_modulus():
    config = SecAggConfig(clip_range=0.5, quantization_bits=40, modulus_bits=64)
    r = Round(6, dim=500, config=config)
    r.xs[r.ids[0]][:10] = [5, -5, 0.5, -0.5, 1e9, -1e9, 0, 0.25, -0.25, 0.49]
    result = r.run()
    r.assert_exact(result)  # the expected sum clips each input to [-0.5, 0.5]
    assert np.abs(result - sum(r.xs.values())).max() > 1  # ... so the plain sum differs


def test_quantize_and_dequantize():
    x = np.array([-8.0, 8.0, 0.0, 100.0, -100.0, 1.2345])
    q = quantize(x, 8.0, 22)
    assert q.dtype == np.uint64
    assert q[0] == 0 and q[1] == 2**22 - 1 and q[3] == 2**22 - 1 and q[4] == 0
    back = dequantize(q, 1, 8.0, 22)
    assert np.abs(back - np.clip(x, -8, 8)).max() <= SecAggConfig().quantum() / 2
    with pytest.raises(SecAggError, match="non-finite"):
        quantize(np.array([1.0, np.nan]), 8.0, 22)


def test_prg_is_deterministic_and_seed_dependent():
    a, b = prg(bytes(32), 1000), prg(bytes(31) + b"\1", 1000)
    assert a.dtype == np.uint64 and len(a) == 1000
    assert np.array_equal(a, prg(bytes(32), 1000))
    assert np.array_equal(a[:10], prg(bytes(32), 10))
    assert np.mean(a == b) < 0.01


# --- dropouts -----------------------------------------------------------------------------


def test_a_client_that_never_sends_keys_is_left_out():
    r = Round(10)
    r.assert_exact(r.run(no_keys={r.ids[4]}))
    assert r.ids[4] not in r.server.survivors and len(r.server.survivors) == 9


def test_a_client_dropping_between_keys_and_shares_is_excluded_cleanly():
    r = Round(10)
    gone = r.ids[2]
    r.keys()
    r.shares(skip={gone})
    for cid in r.server.graph[gone]:  # its neighbours never mask with it
        assert gone not in r.server.shares_for(cid)
    with pytest.raises(SecAggError, match="did not send its shares"):
        r.server.shares_for(gone)
    r.mask()
    survivors = r.unmask()
    assert gone not in survivors and r.server.dropped == []
    r.assert_exact(r.server.result())


def _recoverable(server: SecAggServer, gone: set[int]) -> bool:
    """Whether every client's secret still has t surviving neighbours to reveal it."""
    alive = [c for c in server.graph if c not in gone]
    return len(alive) >= server.t and all(
        sum(v not in gone for v in server.graph[w]) >= server.t for w in server.graph
    )


def _greedy_dropouts(n: int, seed: int, order: int = 1) -> tuple[SecAggServer, set[int]]:
    """The clients to drop after the shares stage: as many as the graph allows, trying them
    in increasing (order=1) or decreasing (order=-1) id order."""
    probe = Round(n, seed=seed).server
    gone: set[int] = set()
    for cid in sorted(probe.graph)[::order]:
        if _recoverable(probe, gone | {cid}):
            gone.add(cid)
    return probe, gone


@pytest.mark.parametrize("order", [1, -1])
def test_dropouts_after_sharing_up_to_what_the_threshold_allows_still_give_the_exact_sum(order):
    probe, gone = _greedy_dropouts(12, seed=5, order=order)
    assert len(gone) >= 2
    r = Round(12, seed=5)
    assert r.server.graph == probe.graph
    r.assert_exact(r.run(after_shares=gone))
    assert r.server.dropped == sorted(gone)


def test_one_dropout_after_sharing_with_neighbours_on_both_sides_of_its_id():
    r = Round(10, seed=2)
    gone = r.ids[5]
    assert min(r.server.graph[gone]) < gone < max(r.server.graph[gone])
    r.assert_exact(r.run(after_shares={gone}))
    assert r.server.dropped == [gone] and len(r.server.survivors) == 9


def test_one_dropout_too_many_is_refused_saying_what_is_missing():
    probe, gone = _greedy_dropouts(12, seed=5)
    extra = next(c for c in sorted(probe.graph) if c not in gone)
    r = Round(12, seed=5)
    with pytest.raises(SecAggError) as e:
        r.run(after_shares=gone | {extra})
    message = str(e.value)
    assert f"{len(gone) + 1} of 12 clients dropped" in message
    assert f"of the {r.server.t} shares needed" in message
    assert "Lower the threshold" in message


def test_survivors_that_do_not_answer_the_unmask_request():
    r = Round(10)
    r.keys()
    r.shares()
    r.mask()
    with pytest.raises(SecAggError, match=r"9 of 10 survivors did not reveal"):
        r.unmask(skip=r.ids[1:])
        r.server.result()


def test_fewer_survivors_than_the_threshold_is_refused():
    r = Round(5, config=SecAggConfig(neighbours=4, threshold=4))
    r.keys()
    r.shares()
    r.mask(skip=r.ids[2:])
    with pytest.raises(SecAggError, match="only 2 clients sent masked inputs, fewer than"):
        r.server.unmask_request()
    with pytest.raises(SecAggError, match="only 2 clients"):
        r.server.result()


def test_a_client_refuses_to_share_with_fewer_neighbours_than_the_threshold():
    r = Round(5, config=SecAggConfig(neighbours=4, threshold=4))
    r.keys(skip={r.ids[0]})
    cid = r.ids[1]
    with pytest.raises(SecAggError, match="only 3 of its neighbours sent keys"):
        client_shares(r.states[cid], cid, r.server.neighbours_public(cid), r.server.t)


# --- what a single masked input reveals ---------------------------------------------------


def _uniform_p_values(y: np.ndarray, bits: int) -> list[float]:
    """p-values of uniformity mod 2^bits: chi-square on the top and low byte, and KS."""
    top = (y >> np.uint64(bits - 8)).astype(np.int64)
    low = (y & np.uint64(255)).astype(np.int64)
    return [
        stats.chisquare(np.bincount(top, minlength=256)).pvalue,
        stats.chisquare(np.bincount(low, minlength=256)).pvalue,
        stats.kstest(y.astype(np.float64) / 2.0**bits, "uniform").pvalue,
    ]


def test_a_masked_input_of_zeros_looks_uniform_even_without_its_self_mask():
    r = Round(6, dim=1 << 16, seed=3)
    for cid in r.ids:
        r.xs[cid][:] = 0.0
    r.keys()
    r.shares()
    cid = r.ids[0]
    seed = r.states[cid]["seed"]
    y = client_mask(r.states[cid], cid, r.server.shares_for(cid), r.xs[cid], r.config)
    assert y.dtype == np.uint64 and int(y.max()) < 2**32
    assert min(_uniform_p_values(y, 32)) > 1e-6
    # the server learns b_u of every survivor: the pairwise masks alone must still hide x
    unseeded = (y - prg(seed, len(y))) & np.uint64(2**32 - 1)
    assert min(_uniform_p_values(unseeded, 32)) > 1e-6
    # the test can fail: the quantized input itself is far from uniform
    plain = quantize(r.xs[cid], 8.0, 22)
    assert max(_uniform_p_values(plain, 32)) < 1e-6


# --- tampering and malformed messages -----------------------------------------------------


def _flip(text: str, at: int = 20) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[at] ^= 1
    return base64.b64encode(bytes(raw)).decode()


def _staged(n: int = 6) -> Round:
    r = Round(n)
    r.keys()
    r.shares()
    return r


def test_a_tampered_ciphertext_is_refused_naming_its_sender():
    r = _staged()
    cid = r.ids[0]
    received = r.server.shares_for(cid)
    sender = next(iter(received))
    before = dict(r.states[cid])
    forged = {**received, sender: _flip(received[sender])}
    with pytest.raises(SecAggError, match=f"the shares from client {sender} do not decrypt"):
        client_mask(r.states[cid], cid, forged, r.xs[cid], r.config)
    assert r.states[cid] == before  # nothing consumed: the honest ciphertexts still work
    client_mask(r.states[cid], cid, received, r.xs[cid], r.config)


def test_a_ciphertext_for_another_client_does_not_decrypt():
    r = _staged()
    a = r.ids[0]
    sender = r.server.graph[a][0]
    b = next(v for v in r.server.graph[sender] if v != a)  # sender also wrote to b
    swapped = {**r.server.shares_for(a), sender: r.server.shares_for(b)[sender]}
    with pytest.raises(SecAggError, match=f"from client {sender} do not decrypt"):
        client_mask(r.states[a], a, swapped, r.xs[a], r.config)


def test_shares_from_a_non_neighbour_are_refused():
    r = _staged(8)
    a = r.ids[0]
    stranger = next(c for c in r.ids if c != a and c not in r.server.graph[a])
    received = {**r.server.shares_for(a), stranger: "AAAA"}
    with pytest.raises(SecAggError, match=rf"received shares from \[{stranger}\]"):
        client_mask(r.states[a], a, received, r.xs[a], r.config)


@pytest.mark.parametrize(
    "public, message",
    [
        ("not base64!", "the public keys of client 1: not valid base64"),
        (base64.b64encode(b"short").decode(), "client 1: 5 bytes, expected 64"),
        ("é" * 4, "client 1: not valid base64"),
        (b"AAAA", "client 1: expected a base64 str, got bytes"),
    ],
)
def test_malformed_public_keys_are_refused_naming_the_client(public, message):
    server = Round(3).server
    with pytest.raises(SecAggError, match=message):
        server.add_keys(1, public)


def test_server_stage_1_and_2_validation():
    r = Round(6)
    server = r.server
    with pytest.raises(SecAggError, match="client 2 was not sampled"):
        server.add_keys(2, client_keys(TAG)[1])
    r.keys()
    with pytest.raises(SecAggError, match="sent its public keys twice"):
        server.add_keys(1, client_keys(TAG)[1])
    with pytest.raises(SecAggError, match="add_shares is out of order: .* stage 1"):
        server.add_shares(1, {})
    peers = server.neighbours_public(1)
    with pytest.raises(SecAggError, match="add_keys is out of order"):
        server.add_keys(1, client_keys(TAG)[1])
    sent = client_shares(r.states[1], 1, peers, server.t)
    missing_one = dict(list(sent.items())[1:])
    with pytest.raises(SecAggError, match="client 1 sent shares for .* expected exactly"):
        server.add_shares(1, missing_one)
    first = next(iter(sent))
    with pytest.raises(
        SecAggError, match=f"shares client 1 sent to client {first}: not valid base64"
    ):
        server.add_shares(1, {**sent, first: "%%%"})
    server.add_shares(1, sent)
    with pytest.raises(SecAggError, match="client 1 sent its shares twice"):
        server.add_shares(1, sent)


def test_a_client_state_survives_pickle_and_drops_its_secrets_after_masking():
    r = Round(5)
    r.keys()
    r.states = {cid: pickle.loads(pickle.dumps(s)) for cid, s in r.states.items()}
    r.shares()
    r.states = {cid: pickle.loads(pickle.dumps(s)) for cid, s in r.states.items()}
    r.mask()
    for state in r.states.values():
        assert not {"c_sk", "s_sk", "seed"} & set(state)
    r.unmask()
    r.assert_exact(r.server.result())


@pytest.fixture
def masked_stage() -> Round:
    r = _staged(6)
    r.server.shares_for(r.ids[0])
    return r


@pytest.mark.parametrize(
    "vector, message",
    [
        (np.zeros(63, np.uint64), r"has shape \(63,\), expected \(64,\)"),
        (np.zeros((2, 32), np.uint64), r"has shape \(2, 32\), expected \(64,\)"),
        (np.zeros(64, np.int64), "must be a uint64 array, got int64"),
        (np.zeros(64, np.float64), "must be a uint64 array, got float64"),
        ([0] * 64, "must be a uint64 array, got list"),
        (np.full(64, 2**32, np.uint64), "has values >= 2\\^32"),
    ],
)
def test_bad_masked_inputs_are_refused(masked_stage, vector, message):
    server = masked_stage.server
    server.add_masked(masked_stage.ids[1], np.zeros(64, np.uint64))  # sets the length
    with pytest.raises(SecAggError, match=f"client {masked_stage.ids[0]} .*{message}"):
        server.add_masked(masked_stage.ids[0], vector)


def test_a_length_given_up_front_is_enforced():
    server = SecAggServer(SecAggConfig(), [0, 1, 2], TAG, np.random.default_rng(0), length=10)
    states = {}
    for cid in range(3):
        states[cid], public = client_keys(TAG)
        server.add_keys(cid, public)
    for cid in range(3):
        sent = client_shares(states[cid], cid, server.neighbours_public(cid), server.t)
        server.add_shares(cid, sent)
    y = client_mask(states[0], 0, server.shares_for(0), np.zeros(11), SecAggConfig())
    with pytest.raises(SecAggError, match=r"shape \(11,\), expected \(10,\)"):
        server.add_masked(0, y)


def test_duplicate_and_unshared_masked_inputs_are_refused():
    r = Round(6)
    r.keys()
    r.shares(skip={r.ids[5]})
    with pytest.raises(SecAggError, match="add_masked is out of order"):
        r.server.add_masked(r.ids[0], np.zeros(64, np.uint64))
    r.mask()
    with pytest.raises(SecAggError, match=f"client {r.ids[0]} sent its masked input twice"):
        r.server.add_masked(r.ids[0], np.zeros(64, np.uint64))
    with pytest.raises(SecAggError, match=f"client {r.ids[5]} did not send its shares"):
        r.server.add_masked(r.ids[5], np.zeros(64, np.uint64))


def _masked(n: int = 6) -> Round:
    r = _staged(n)
    r.mask()
    return r


def test_a_client_refuses_intersecting_survivors_and_dropped():
    r = _masked()
    cid = r.ids[0]
    with pytest.raises(SecAggError, match=r"clients \[4\] are listed both as survivors and"):
        client_unmask(r.states[cid], cid, r.ids, [r.ids[1]])


def test_a_client_refuses_to_unmask_twice():
    r = _masked()
    cid = r.ids[0]
    client_unmask(r.states[cid], cid, r.ids, [])
    with pytest.raises(SecAggError, match="asked to unmask twice"):
        client_unmask(r.states[cid], cid, r.ids, [])


def test_a_client_refuses_lists_that_disagree_with_what_it_received():
    r = _masked()
    cid = r.ids[0]
    with pytest.raises(SecAggError, match="is not listed as a survivor"):
        client_unmask(r.states[cid], cid, r.ids[1:], [cid])
    outsider = 10**6  # not a neighbour: ignored
    revealed = client_unmask(dict(r.states[cid]), cid, [*r.ids, outsider], [])
    assert set(revealed) == set(r.server.shares_for(cid))
    state = dict(r.states[cid])
    neighbour = next(iter(state["held"]))
    state["held"] = {w: s for w, s in state["held"].items() if w != neighbour}
    with pytest.raises(SecAggError, match=rf"asked about neighbours \[{neighbour}\]"):
        client_unmask(state, cid, r.ids, [])


def test_client_calls_out_of_order():
    state, _ = client_keys(TAG)
    with pytest.raises(
        SecAggError, match="client_mask is out of order .* next call is client_shares"
    ):
        client_mask(state, 1, {}, np.zeros(3), SecAggConfig())
    with pytest.raises(SecAggError, match="client_unmask is out of order"):
        client_unmask(state, 1, [1], [])
    r = _staged(4)
    with pytest.raises(SecAggError, match="this state belongs to client 1, not 4"):
        client_mask(r.states[1], 4, {}, np.zeros(3), SecAggConfig())


def test_reveal_validation_and_a_lying_neighbour():
    r = Round(8, config=SecAggConfig(neighbours=6, threshold=3))
    r.keys()
    r.shares()
    gone = r.ids[7]
    r.mask(skip={gone})
    survivors, dropped = r.server.unmask_request()
    assert dropped == [gone]
    with pytest.raises(SecAggError, match="add_masked is out of order"):
        r.server.add_masked(gone, np.zeros(64, np.uint64))
    with pytest.raises(SecAggError, match="is not a survivor"):
        r.server.add_reveal(gone, {})
    first = survivors[0]
    revealed = client_unmask(r.states[first], first, survivors, dropped)
    w = next(iter(revealed))
    with pytest.raises(SecAggError, match=f"client {first} revealed shares of"):
        r.server.add_reveal(first, {k: v for k, v in revealed.items() if k != w})
    with pytest.raises(
        SecAggError, match=f"client {first}'s share of client {w}: not valid base64"
    ):
        r.server.add_reveal(first, {**revealed, w: "?"})
    liar = next(c for c in survivors if gone in r.server.graph[c] and c != first)
    r.server.add_reveal(first, revealed)
    with pytest.raises(SecAggError, match=f"client {first} revealed its shares twice"):
        r.server.add_reveal(first, revealed)
    for cid in survivors[1:]:
        answer = client_unmask(r.states[cid], cid, survivors, dropped)
        if cid == liar:
            answer[gone] = base64.b64encode((12345).to_bytes(66, "big")).decode()
        r.server.add_reveal(cid, answer)
    with pytest.raises(SecAggError, match=f"shares revealed for client {gone} disagree"):
        r.server.result()


def test_consistently_wrong_shares_of_a_dropped_client_are_caught_by_its_public_key():
    r = Round(6)
    r.keys()
    r.shares()
    gone = r.ids[0]
    r.mask(skip={gone})
    survivors, dropped = r.server.unmask_request()
    for cid in survivors:
        answer = client_unmask(r.states[cid], cid, survivors, dropped)
        if gone in answer:  # every share + 1: the shares agree, on the secret + 1
            share = int.from_bytes(base64.b64decode(answer[gone]), "big") + 1
            answer[gone] = base64.b64encode(share.to_bytes(66, "big")).decode()
        r.server.add_reveal(cid, answer)
    with pytest.raises(SecAggError, match=f"dropped client {gone} do not give its mask key"):
        r.server.result()


def test_server_calls_out_of_order():
    r = Round(4)
    with pytest.raises(SecAggError, match="result is out of order: .* stage 1"):
        r.server.result()
    r.keys()
    r.shares()
    with pytest.raises(SecAggError, match="add_reveal is out of order"):
        r.server.add_reveal(r.ids[0], {})
    r.mask()
    r.unmask()
    first = r.server.result()
    assert np.array_equal(first, r.server.result())  # the result can be read again
    with pytest.raises(SecAggError, match="stage done"):
        r.server.shares_for(r.ids[0])


def test_errors_belong_to_the_privacy_tree():
    assert issubclass(SecAggError, PrivacyError) and issubclass(SecAggError, PollinateError)


# --- configuration ------------------------------------------------------------------------


def test_overflow_is_refused_with_the_largest_number_of_clients_that_fits():
    config = SecAggConfig()
    assert config.max_clients() == 1024
    config.check(1024)
    with pytest.raises(ConfigError, match="sample at most 1024 clients per round"):
        config.check(1025)
    with pytest.raises(ConfigError, match="could wrap around the modulus 2\\^32"):
        SecAggServer(config, range(1025), TAG, np.random.default_rng(0))
    assert SecAggConfig(quantization_bits=16, modulus_bits=20).max_clients() == 16


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"neighbours": 1}, "neighbours must be a whole count >= 2"),
        ({"neighbours": 0.0}, "neighbours must be"),
        ({"neighbours": 2.5}, "neighbours must be"),
        ({"neighbours": float("nan")}, "neighbours must be"),
        ({"neighbours": True}, "neighbours must be"),
        ({"neighbours": "5"}, "neighbours must be"),
        ({"threshold": 0}, "threshold must be a whole count >= 1"),
        ({"threshold": -0.5}, "threshold must be"),
        ({"threshold": 1.5}, "threshold must be"),
        ({"clip_range": 0}, "clip_range must be a finite number > 0"),
        ({"clip_range": float("inf")}, "clip_range must be"),
        ({"quantization_bits": 0}, "quantization_bits must be an int in \\[1, 53\\]"),
        ({"quantization_bits": 8.0}, "quantization_bits must be an int"),
        ({"modulus_bits": 65}, "modulus_bits must be an int in \\[2, 64\\]"),
        ({"quantization_bits": 32}, "quantization_bits \\(32\\) must be below modulus_bits"),
    ],
)
def test_bad_parameters_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SecAggConfig(**kwargs)


@pytest.mark.parametrize(
    "config, n, plan",
    [
        (SecAggConfig(), 10, (5, 3)),  # ceil(0.5·9) = 5 (n even: odd k is fine), ceil(0.6·5)
        (SecAggConfig(), 11, (6, 4)),  # 5 is odd and n is odd: rounded up to 6
        (SecAggConfig(), 2, (1, 1)),
        (SecAggConfig(), 3, (2, 2)),
        (SecAggConfig(neighbours=0.1), 40, (4, 3)),  # ceil(3.9) = 4
        (SecAggConfig(neighbours=0.01), 40, (2, 2)),  # at least 2: the ring stays connected
        (SecAggConfig(neighbours=8, threshold=5), 6, (5, 5)),  # k <= n − 1
        (SecAggConfig(neighbours=4, threshold=10), 50, (4, 4)),  # t <= k
        (SecAggConfig(neighbours=10.0, threshold=1), 50, (10, 1)),  # 10.0 is a count
        (SecAggConfig(neighbours=1.0, threshold=1.0), 7, (6, 6)),  # 1.0: all of them
    ],
)
def test_plan(config, n, plan):
    assert config.plan(n) == plan


def test_plan_needs_two_clients():
    with pytest.raises(SecAggError, match="at least 2 clients"):
        SecAggConfig().plan(1)


def test_quantum():
    assert SecAggConfig(clip_range=1.0, quantization_bits=2).quantum() == pytest.approx(2 / 3)


@pytest.mark.parametrize("n, k", [(2, 1), (5, 2), (5, 4), (8, 3), (8, 7), (9, 6), (30, 4), (31, 5)])
def test_neighbour_graph_is_symmetric_regular_and_connected(n, k):
    ids = [10 * i for i in range(n)]
    if k % 2 and n % 2:
        with pytest.raises(SecAggError, match=f"use k = {k + 1}"):
            neighbour_graph(ids, k, np.random.default_rng(0))
        return
    graph = neighbour_graph(ids, k, np.random.default_rng(0))
    assert sorted(graph) == ids
    for cid, peers in graph.items():
        assert len(peers) == k and cid not in peers
        assert all(cid in graph[v] for v in peers)
    seen, todo = {ids[0]}, [ids[0]]
    while todo:
        for v in graph[todo.pop()]:
            if v not in seen:
                seen.add(v)
                todo.append(v)
    assert len(seen) == n
    other = neighbour_graph(ids, k, np.random.default_rng(1))
    assert k == n - 1 or other != graph  # a random relabelling


# --- Shamir -------------------------------------------------------------------------------


def test_any_t_shares_reconstruct_and_t_minus_1_do_not():
    secret = int.from_bytes(bytes(range(1, 33)), "big")
    xs = [2, 5, 9, 11, 30, 31, 100]
    shares = shamir_split(secret, 4, xs)
    for subset in itertools.combinations(xs, 4):
        assert shamir_reconstruct({x: shares[x] for x in subset}) == secret
    for subset in itertools.combinations(xs, 3):
        assert shamir_reconstruct({x: shares[x] for x in subset}) != secret
    assert shamir_reconstruct(shares) == secret  # more than t: the same polynomial
    assert all(0 <= y < PRIME for y in shares.values())


def test_shamir_input_checks():
    with pytest.raises(SecAggError, match="threshold 4 must be in"):
        shamir_split(1, 4, [1, 2, 3])
    with pytest.raises(SecAggError, match="distinct and nonzero"):
        shamir_split(1, 2, [0, 1])
    with pytest.raises(SecAggError, match="secret must be"):
        shamir_split(PRIME, 1, [1])


@pytest.mark.parametrize("length", [0, 1, 131_071, 131_072, 131_073, 400_000])
def test_prg_is_the_chacha20_keystream_across_chunk_boundaries(length: int) -> None:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    seed = bytes(range(32))
    encryptor = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    expected = np.frombuffer(encryptor.update(bytes(8 * length)), dtype="<u8")
    np.testing.assert_array_equal(prg(seed, length), expected)
