"""The client halves of FedProx, SCAFFOLD and q-FedAvg in ``TorchClassifier``.

Each is checked against a hand-written PyTorch loop of the paper's update on a tiny model.
Full-batch training (batch_size = n) keeps the references free of the client's shuffling.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from pollinate.errors import ConfigError, UpdateRejected  # noqa: E402
from pollinate.frameworks.torch import (  # noqa: E402
    TorchClassifier,
    classification_app,
    get_arrays,
    initial_arrays,
    set_arrays,
)
from pollinate.frameworks.torch_algorithms import SCAFFOLD_STATE_KEY  # noqa: E402
from pollinate.simulation.backends.sequential import SequentialBackend  # noqa: E402
from pollinate.simulation.engine import SimulationExecutor  # noqa: E402
from pollinate.types import TrainIns  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def linear() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3))


def batchnorm_mlp() -> nn.Module:
    """Buffers (running stats, an int64 counter) between the trainable parameters."""
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))


def dropout_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))


def data(n: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 3, n).astype(np.int64)


def moved(arrays: list[np.ndarray], seed: int = 1) -> list[np.ndarray]:
    """``arrays`` with their float entries perturbed: a global model the model_fn did not make."""
    rng = np.random.default_rng(seed)
    return [
        a + rng.normal(scale=0.3, size=a.shape).astype(a.dtype) if a.dtype.kind == "f" else a
        for a in arrays
    ]


def is_param(model: nn.Module) -> list[bool]:
    params = {id(p) for p in model.parameters()}
    return [id(t) in params for t in model.state_dict(keep_vars=True).values()]


def reference_steps(fn, arrays, xy, steps, lr, mu=0.0, c=None, c_i=None):  # type: ignore[no-untyped-def]
    """Full-batch SGD on CE + μ/2·‖w − w_g‖² (by autograd) with g ← g + c − c_i per step."""
    model = fn()
    set_arrays(model, arrays)
    model.train()
    params = list(model.parameters())
    anchors = [p.detach().clone() for p in params]
    x, y = torch.from_numpy(xy[0]), torch.from_numpy(xy[1])
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        loss = loss + mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for k, (p, g) in enumerate(zip(params, grads)):
                if c is not None:
                    g = g + c[k] - c_i[k]
                p -= lr * g
    return model, anchors


# --- num_steps and initial_loss -----------------------------------------------------------------


@pytest.mark.parametrize(("n", "batch_size", "epochs"), [(10, 4, 2), (12, 12, 3), (7, 1, 1)])
def test_num_steps_is_epochs_times_batches(n, batch_size, epochs):
    client = TorchClassifier(linear(), data(n))
    res = client.train(initial_arrays(linear, 0), {"batch_size": batch_size, "epochs": epochs})
    assert res.metrics["num_steps"] == epochs * math.ceil(n / batch_size)
    assert isinstance(res.metrics["num_steps"], int)


class Pairs(Dataset):
    """A generic map-style Dataset: trained through a DataLoader."""

    def __init__(self, xy):  # type: ignore[no-untyped-def]
        self.x, self.y = xy

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):  # type: ignore[no-untyped-def]
        return torch.from_numpy(self.x[i]), int(self.y[i])


def test_num_steps_and_initial_loss_through_a_dataloader():
    xy = data(11)  # batches of 3, 3, 3, 2 (BatchNorm needs 2 per batch)
    client = TorchClassifier(batchnorm_mlp(), Pairs(xy), test_data=Pairs(xy))
    arrays = moved(initial_arrays(batchnorm_mlp, 0))
    config = {"batch_size": 3, "epochs": 2, "report_initial_loss": True}
    res = client.train(arrays, config)
    assert res.metrics["num_steps"] == 2 * 4
    assert res.metrics["initial_loss"] == pytest.approx(client.evaluate(arrays, {}).loss, 1e-6)


def test_initial_loss_is_the_received_models_loss_on_the_training_data():
    xy = data(40)
    arrays = moved(initial_arrays(batchnorm_mlp, 0))
    client = TorchClassifier(batchnorm_mlp(), xy, test_data=xy)
    config = {"batch_size": 8, "epochs": 2, "lr": 0.1, "seed": 3}
    res = client.train(arrays, {**config, "report_initial_loss": True})
    # by hand: the received model in eval mode (running statistics), mean CE over all of xy
    model = batchnorm_mlp()
    set_arrays(model, arrays)
    model.eval()
    with torch.no_grad():
        expected = F.cross_entropy(model(torch.from_numpy(xy[0])), torch.from_numpy(xy[1]))
    assert res.metrics["initial_loss"] == pytest.approx(expected.item(), rel=1e-6)
    assert res.metrics["initial_loss"] != pytest.approx(res.metrics["loss"], rel=1e-3)
    # evaluating first changes nothing about the training (eval mode: no buffer moves)
    plain = client.train(arrays, config)
    assert "initial_loss" not in plain.metrics
    for a, b in zip(res.arrays, plain.arrays):
        np.testing.assert_array_equal(a, b)


# --- FedProx -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [linear, batchnorm_mlp])
def test_fedprox_steps_follow_the_gradient_of_the_proximal_objective(fn):
    xy = data(12)
    arrays = moved(initial_arrays(fn, 0))
    lr, mu, steps = 0.5, 0.7, 4
    config = {"batch_size": 12, "epochs": steps, "lr": lr, "proximal_mu": mu}
    res = TorchClassifier(fn(), xy).train(arrays, config)
    assert res.metrics["num_steps"] == steps
    expected, _ = reference_steps(fn, arrays, xy, steps, lr, mu=mu)
    for got, want in zip(res.arrays, get_arrays(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # and the proximal term mattered: without it the result is elsewhere
    plain, _ = reference_steps(fn, arrays, xy, steps, lr)
    assert not np.allclose(res.arrays[0], get_arrays(plain)[0], rtol=1e-5, atol=1e-6)


def test_fedprox_mu_zero_is_bit_identical_to_no_key():
    xy = data(30)
    arrays = moved(initial_arrays(dropout_mlp, 0))
    config = {"batch_size": 7, "epochs": 2, "lr": 0.2, "momentum": 0.9, "seed": 5}
    client = TorchClassifier(dropout_mlp(), xy)
    plain = client.train(arrays, config)
    zero = client.train(arrays, {**config, "proximal_mu": 0.0})
    for a, b in zip(plain.arrays, zero.arrays):
        np.testing.assert_array_equal(a, b)
    assert plain.metrics == zero.metrics


def test_fedprox_with_a_large_mu_stays_closer_to_the_global_model():
    xy = data(60, seed=2)
    arrays = initial_arrays(dropout_mlp, 0)
    config = {"batch_size": 10, "epochs": 5, "lr": 0.1, "seed": 1}
    client = TorchClassifier(dropout_mlp(), xy)

    def distance(res) -> float:  # type: ignore[no-untyped-def]
        return math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(res.arrays, arrays)))

    free = distance(client.train(arrays, config))
    held = distance(client.train(arrays, {**config, "proximal_mu": 5.0}))
    assert held < 0.5 * free


def test_fedprox_skips_frozen_parameters():
    def frozen() -> nn.Module:
        model = batchnorm_mlp()
        model[0].weight.requires_grad_(False)
        return model

    arrays = moved(initial_arrays(frozen, 0))
    res = TorchClassifier(frozen(), data()).train(arrays, {"proximal_mu": 1.0, "epochs": 2})
    np.testing.assert_array_equal(res.arrays[0], arrays[0])


@pytest.mark.parametrize("value", [-0.1, float("inf"), float("nan"), "0.1", True])
def test_fedprox_refuses_a_bad_mu(value):
    client = TorchClassifier(linear(), data())
    with pytest.raises(ConfigError, match="proximal_mu"):
        client.train(initial_arrays(linear, 0), {"proximal_mu": value})


# --- SCAFFOLD -----------------------------------------------------------------------------------


def controls(fn, seed: int, scale: float = 0.2) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    """A control variate for ``fn()``: random for parameters, zeros (own dtype) elsewhere."""
    rng = np.random.default_rng(seed)
    out = []
    for array, param in zip(initial_arrays(fn, 0), is_param(fn())):
        if param:
            out.append(rng.normal(scale=scale, size=array.shape).astype(array.dtype))
        else:
            out.append(np.zeros_like(array))
    return out


def trainable(values, fn):  # type: ignore[no-untyped-def]
    return [torch.from_numpy(v) for v, p in zip(values, is_param(fn())) if p]


@pytest.mark.parametrize(("fn", "mu"), [(linear, 0.0), (batchnorm_mlp, 0.0), (batchnorm_mlp, 0.4)])
def test_scaffold_task_matches_option_two_by_hand(fn, mu):
    xy = data(12)
    arrays = moved(initial_arrays(fn, 0))
    c, c_i = controls(fn, 1), controls(fn, 2)
    lr, steps = 0.3, 3
    state = {SCAFFOLD_STATE_KEY: [a.copy() for a in c_i]}
    config = {"batch_size": 12, "epochs": steps, "lr": lr, "scaffold": True, "proximal_mu": mu}
    res = TorchClassifier(fn(), xy, state=state).train(arrays + c, config)
    n = len(arrays)
    assert len(res.arrays) == 2 * n
    assert res.metrics["num_steps"] == steps
    assert [a.dtype for a in res.arrays] == [a.dtype for a in arrays] * 2

    expected, _ = reference_steps(
        fn, arrays, xy, steps, lr, mu=mu, c=trainable(c, fn), c_i=trainable(c_i, fn)
    )
    y = get_arrays(expected)
    for got, want in zip(res.arrays[:n], y):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for k, param in enumerate(is_param(fn())):
        new = state[SCAFFOLD_STATE_KEY][k]
        delta = res.arrays[n + k]
        if param:  # c_i⁺ = c_i − c + (x − y_i)/(K·η), sent as c_i⁺ − c_i
            want = c_i[k] - c[k] + (arrays[k] - y[k]) / (steps * lr)
            np.testing.assert_allclose(new, want, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(delta, want - c_i[k], rtol=1e-4, atol=1e-5)
        else:  # buffers: zeros of the entry's own dtype
            assert not new.any() and not delta.any()
            assert delta.dtype == arrays[k].dtype


def test_scaffold_correction_changes_the_trajectory_only_through_c_minus_c_i():
    xy = data(12)
    arrays = moved(initial_arrays(linear, 0))
    config = {"batch_size": 5, "epochs": 2, "lr": 0.3, "seed": 4}
    plain = TorchClassifier(linear(), xy).train(arrays, config)
    same = controls(linear, 7)  # c = c_i: no correction at all
    state = {SCAFFOLD_STATE_KEY: [a.copy() for a in same]}
    res = TorchClassifier(linear(), xy, state=state).train(
        arrays + same, {**config, "scaffold": True}
    )
    for a, b in zip(plain.arrays, res.arrays[: len(arrays)]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_scaffold_starts_from_zero_variates_and_keeps_c_i_between_tasks(tmp_path):
    """Two rounds through the engine (executor + sequential backend + state store): round 2
    starts from the c_i round 1 left in the client's state."""
    fn = batchnorm_mlp
    xy = data(16)

    class Data:
        def client_train(self, cid):  # type: ignore[no-untyped-def]
            return xy

        def client_test(self, cid):  # type: ignore[no-untyped-def]
            return xy[0][:0], xy[1][:0]

    backend = SequentialBackend()
    backend.start(classification_app(fn, Data()))
    executor = SimulationExecutor(backend, seed=3)
    config = {"batch_size": 16, "epochs": 2, "lr": 0.2, "scaffold": True}
    arrays, c = moved(initial_arrays(fn, 0)), controls(fn, 5)
    n = len(arrays)
    saved = []
    for round_number in (1, 2):
        before = executor.state_store.get(0).get(SCAFFOLD_STATE_KEY)
        [outcome] = executor.submit(round_number, "train", [(0, TrainIns(arrays + c, config))], 60)
        assert outcome.ok, outcome.traceback
        res = outcome.result
        kept = executor.state_store.get(0)[SCAFFOLD_STATE_KEY]
        # the same task by hand from the state this round started with (zeros in round 1)
        c_i = [np.zeros_like(a) for a in c] if before is None else before
        expected, _ = reference_steps(
            fn, arrays, xy, 2, 0.2, c=trainable(c, fn), c_i=trainable(c_i, fn)
        )
        y = get_arrays(expected)
        for k, param in enumerate(is_param(fn())):
            if param:
                want = c_i[k] - c[k] + (arrays[k] - y[k]) / (2 * 0.2)
                np.testing.assert_allclose(kept[k], want, rtol=1e-4, atol=1e-5)
                np.testing.assert_allclose(res.arrays[n + k], want - c_i[k], rtol=1e-4, atol=1e-5)
        saved.append(kept)
        arrays = res.arrays[:n]
    assert not np.allclose(saved[0][0], saved[1][0])
    backend.close()


def test_scaffold_refuses_arrays_without_control_variates():
    client = TorchClassifier(batchnorm_mlp(), data())
    arrays = initial_arrays(batchnorm_mlp, 0)
    with pytest.raises(UpdateRejected, match=rf"{2 * len(arrays)} arrays.*has {len(arrays)}"):
        client.train(arrays, {"scaffold": True})
    wrong = controls(batchnorm_mlp, 0)
    wrong[2] = np.zeros((7,), np.float32)
    with pytest.raises(UpdateRejected, match="control variate for '1.weight' has shape"):
        client.train(arrays + wrong, {"scaffold": True})
    with pytest.raises(ConfigError, match="'scaffold' must be true or false"):
        client.train(arrays, {"scaffold": 1})


def test_scaffold_refuses_a_saved_variate_of_another_model():
    state = {SCAFFOLD_STATE_KEY: controls(linear, 0)}
    client = TorchClassifier(batchnorm_mlp(), data(), state=state)
    arrays = initial_arrays(batchnorm_mlp, 0)
    with pytest.raises(ConfigError, match="saved SCAFFOLD variate.*another model"):
        client.train(arrays + controls(batchnorm_mlp, 1), {"scaffold": True})
    assert state[SCAFFOLD_STATE_KEY][0].shape == (3, 4)  # left as it was


def test_scaffold_gives_frozen_parameters_and_buffers_zero_variates():
    def frozen() -> nn.Module:
        model = batchnorm_mlp()
        model[3].bias.requires_grad_(False)
        return model

    state: dict = {}
    arrays = moved(initial_arrays(frozen, 0))
    c = controls(frozen, 1)
    res = TorchClassifier(frozen(), data(), state=state).train(arrays + c, {"scaffold": True})
    n = len(arrays)
    keys = list(frozen().state_dict())
    for k, key in enumerate(keys):
        zero = key in ("3.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked")
        assert (not res.arrays[n + k].any()) == zero, key
        assert (not state[SCAFFOLD_STATE_KEY][k].any()) == zero, key
