"""The PyTorch adapter: Arrays conversion, the classification client and its helpers."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import Dataset, TensorDataset  # noqa: E402

from pollinate.client import Client, ClientContext  # noqa: E402
from pollinate.errors import ConfigError, DataError, UpdateRejected  # noqa: E402
from pollinate.frameworks.torch import (  # noqa: E402
    TorchClassifier,
    classification_app,
    get_arrays,
    initial_arrays,
    set_arrays,
    torch_evaluator,
)
from pollinate.models import model_fn  # noqa: E402
from tests.waiting import patience  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-reproducible and fast on a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    """sklearn's 8x8 digits as channels-first float32 images: (train, test) pairs."""
    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


LOGREG = model_fn("logreg", (1, 8, 8), 10)
MLP = model_fn("mlp", (1, 8, 8), 10, hidden=(32,))


def dropout_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10)
    )


def batchnorm_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)
    )


def batchnorm_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 10),
    )


def train_client(fn, data, config, test=None):
    client = TorchClassifier(fn(), data, test)
    return client, client.train(initial_arrays(fn, 0), config)


# --- get_arrays / set_arrays ------------------------------------------------------------------


def test_arrays_round_trip_includes_batchnorm_buffers():
    source = batchnorm_cnn()
    source.train()
    source(torch.randn(16, 1, 8, 8))  # moves running stats and num_batches_tracked
    arrays = get_arrays(source)
    state = source.state_dict()
    assert len(arrays) == len(state)
    for array, (key, tensor) in zip(arrays, state.items()):
        assert isinstance(array, np.ndarray)
        assert array.shape == tuple(tensor.shape), key
        np.testing.assert_array_equal(array, tensor.numpy())
    assert arrays[list(state).index("1.num_batches_tracked")].dtype == np.int64
    assert int(arrays[list(state).index("1.num_batches_tracked")]) == 1

    target = batchnorm_cnn()
    set_arrays(target, arrays)
    for key, tensor in target.state_dict().items():
        assert torch.equal(tensor, state[key]), key
    x = torch.randn(5, 1, 8, 8)
    source.eval()
    target.eval()
    assert torch.equal(source(x), target(x))


def test_arrays_are_copies_detached_from_the_module():
    model = batchnorm_cnn()
    arrays = get_arrays(model)
    before = [a.copy() for a in arrays]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for a, b in zip(arrays, before):
        np.testing.assert_array_equal(a, b)
    arrays[0] += 5.0
    assert not np.array_equal(model.state_dict()["0.weight"].numpy(), arrays[0])
    set_arrays(model, arrays)
    arrays[0] += 1.0  # the model holds its own copy
    np.testing.assert_array_equal(model.state_dict()["0.weight"].numpy(), arrays[0] - 1.0)


def test_set_arrays_rejects_wrong_count():
    model = batchnorm_cnn()
    arrays = get_arrays(model)
    with pytest.raises(UpdateRejected, match=f"got {len(arrays) - 1} arrays .* {len(arrays)}"):
        set_arrays(model, arrays[:-1])


def test_set_arrays_rejects_wrong_shape_naming_the_key_and_is_atomic():
    model = batchnorm_cnn()
    arrays = get_arrays(model)
    bad = [a + 1 if a.dtype.kind == "f" else a for a in arrays]
    bad[-2] = np.zeros((10, 5), dtype=np.float32)  # 4.weight should be (10, 144)
    with pytest.raises(UpdateRejected, match=r"'4\.weight'.*\(10, 5\).*\(10, 144\)"):
        set_arrays(model, bad)
    for a, b in zip(get_arrays(model), arrays):  # nothing was written
        np.testing.assert_array_equal(a, b)


def test_set_arrays_rejects_float_into_integer_buffer():
    model = batchnorm_cnn()
    arrays = get_arrays(model)
    index = list(model.state_dict()).index("1.num_batches_tracked")
    arrays[index] = arrays[index].astype(np.float64)
    with pytest.raises(UpdateRejected, match="num_batches_tracked.*float64.*int64"):
        set_arrays(model, arrays)


def test_set_arrays_casts_float64_into_float32():
    model = batchnorm_cnn()
    arrays = [a.astype(np.float64) + 0.5 if a.dtype.kind == "f" else a for a in get_arrays(model)]
    set_arrays(model, arrays)
    for got, want in zip(get_arrays(model), arrays):
        np.testing.assert_allclose(got, want, rtol=1e-6)
        assert got.dtype != np.float64


# --- training ---------------------------------------------------------------------------------


def test_logreg_learns_digits(digits):
    train, test = digits
    client = TorchClassifier(LOGREG(), train, test)
    arrays = initial_arrays(LOGREG, 0)
    first = client.evaluate(arrays, {})
    res = client.train(arrays, {"epochs": 5, "lr": 0.5, "seed": 1})
    assert isinstance(client, Client)
    assert res.num_examples == len(train[1])
    assert set(res.metrics) == {"loss", "accuracy", "num_steps"}
    assert res.metrics["num_steps"] == 5 * 44  # 1400 examples in batches of 32
    again = client.train(res.arrays, {"epochs": 1, "lr": 0.5, "seed": 2})
    assert again.metrics["loss"] < res.metrics["loss"]
    after = client.evaluate(again.arrays, {})
    assert after.loss < first.loss
    assert after.metrics["accuracy"] > 0.9 > first.metrics["accuracy"]
    assert after.num_examples == len(test[1])


def test_mlp_learns_digits_with_adam(digits):
    train, test = digits
    client = TorchClassifier(MLP(), train, test)
    res = client.train(
        initial_arrays(MLP, 0), {"epochs": 5, "optimizer": "adam", "lr": 0.01, "seed": 0}
    )
    assert res.metrics["accuracy"] > 0.9
    assert client.evaluate(res.arrays, {"batch_size": 64}).metrics["accuracy"] > 0.9


def test_same_seed_is_bit_identical_and_different_seed_differs(digits):
    train, _ = digits
    config = {"epochs": 2, "batch_size": 16, "lr": 0.05, "seed": 7}
    _, a = train_client(dropout_mlp, train, config)
    _, b = train_client(dropout_mlp, train, config)
    _, c = train_client(dropout_mlp, train, {**config, "seed": 8})
    for x, y in zip(a.arrays, b.arrays):
        np.testing.assert_array_equal(x, y)
    assert a.metrics == b.metrics
    assert any(not np.array_equal(x, y) for x, y in zip(a.arrays, c.arrays))


def test_training_leaves_the_global_rng_alone(digits):
    train, _ = digits
    client = TorchClassifier(dropout_mlp(), train)
    arrays = initial_arrays(dropout_mlp, 0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    client.train(arrays, {"seed": 5})
    assert torch.equal(torch.rand(3), expected)


def plain_loop(fn, arrays, x, y, *, epochs, batch_size, seed, make_optimizer):
    """The reference: the plain PyTorch loop the adapter must reproduce exactly."""
    model = fn()
    model.load_state_dict({k: torch.tensor(a) for k, a in zip(model.state_dict(), arrays)})
    model.train()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(model.parameters())
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        perm = torch.randperm(len(yt), generator=generator)
        for start in range(0, len(yt), batch_size):
            idx = perm[start : start + batch_size]
            optimizer.zero_grad()
            loss = nn.CrossEntropyLoss()(model(xt[idx]), yt[idx])
            loss.backward()
            optimizer.step()
    return [t.numpy() for t in model.state_dict().values()]


@pytest.mark.parametrize(
    ("config", "make_optimizer"),
    [
        ({"lr": 0.1}, lambda p: torch.optim.SGD(p, lr=0.1)),
        ({"lr": 0.1, "momentum": 0.9}, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
        ({"lr": 0.1, "weight_decay": 0.1}, lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.1)),
        (
            {"lr": 0.05, "momentum": 0.5, "weight_decay": 0.01},
            lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5, weight_decay=0.01),
        ),
        ({"optimizer": "adam", "lr": 0.01}, lambda p: torch.optim.Adam(p, lr=0.01)),
        (
            {"optimizer": "Adam", "lr": 0.01, "weight_decay": 0.01},
            lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01),
        ),
    ],
)
@pytest.mark.parametrize("fn", [dropout_mlp, batchnorm_mlp])
def test_training_is_the_plain_loop_with_the_configured_optimizer(
    digits, config, make_optimizer, fn
):
    """pollinate's own SGD/Adam (``torch_optim``) are bit-identical to ``torch.optim`` on CPU."""
    (x, y), _ = digits
    x, y = x[:300], y[:300]
    arrays = initial_arrays(fn, 3)
    full = {"epochs": 2, "batch_size": 20, "seed": 11, **config}
    res = TorchClassifier(fn(), (x, y)).train(arrays, full)
    want = plain_loop(
        fn, arrays, x, y, epochs=2, batch_size=20, seed=11, make_optimizer=make_optimizer
    )
    for got, expected in zip(res.arrays, want):
        np.testing.assert_array_equal(got, expected)  # exact: the same arithmetic


DYNAMO_PROBE = """
import sys
import numpy as np
from pollinate.frameworks.torch import TorchClassifier, initial_arrays, torch_evaluator
from pollinate.models import model_fn

mlp = model_fn("mlp", (1, 8, 8), 10, hidden=(16,))
rng = np.random.default_rng(0)
x = rng.random((64, 1, 8, 8), dtype=np.float32)
y = rng.integers(0, 10, 64)
client = TorchClassifier(mlp(), (x, y), (x, y))
arrays = initial_arrays(mlp, 0)
for config in ({"momentum": 0.9, "weight_decay": 0.1}, {"optimizer": "adam"}):
    arrays = client.train(arrays, {"local_evaluation": True, **config}).arrays
client.evaluate(arrays, {})
torch_evaluator(mlp, x, y)(arrays)
print("after pollinate:", "torch._dynamo" in sys.modules)
import torch
torch.optim.SGD(mlp().parameters(), lr=0.1)
print("after torch.optim:", "torch._dynamo" in sys.modules)
"""


def test_training_does_not_import_torch_dynamo():
    """A process that only trains and evaluates never imports ``torch._dynamo``.

    ``torch.optim`` optimizers import it (~1.5 s of CPU on the benchmark machine) the first
    time one is built in a process: in every process-backend worker and deployed client. The
    probe builds a ``torch.optim`` optimizer at the end to show this test can fail.
    """
    done = subprocess.run(
        [sys.executable, "-c", DYNAMO_PROBE],
        capture_output=True,
        text=True,
        timeout=patience(120),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert "after pollinate: False" in done.stdout, done.stdout
    # the control: if torch.optim stops importing torch._dynamo, this test proves nothing
    assert "after torch.optim: True" in done.stdout, done.stdout


def test_optimizer_settings_change_the_result(digits):
    train, _ = digits
    base = {"epochs": 1, "lr": 0.05, "seed": 0}
    results = {
        name: train_client(MLP, train, {**base, **extra})[1].arrays
        for name, extra in {
            "sgd": {},
            "momentum": {"momentum": 0.9},
            "adam": {"optimizer": "adam", "lr": 0.001},
            "decay": {"weight_decay": 0.5},
        }.items()
    }
    names = list(results)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert any(not np.array_equal(u, v) for u, v in zip(results[a], results[b])), (a, b)
    norm = {k: sum(float(np.sum(w * w)) for w in v) for k, v in results.items()}
    assert norm["decay"] < 0.9 * norm["sgd"]  # weight decay shrinks the weights


def test_weight_decay_is_the_sgd_l2_step(digits):
    (x, y), _ = digits
    arrays = initial_arrays(LOGREG, 0)
    one_step = {"epochs": 1, "batch_size": len(y), "lr": 0.1, "seed": 0}
    plain = train_client(LOGREG, (x, y), one_step)[1].arrays
    decayed = train_client(LOGREG, (x, y), {**one_step, "weight_decay": 0.2})[1].arrays
    for p0, a, b in zip(arrays, plain, decayed):  # p - lr * (g + wd * p)
        np.testing.assert_allclose(b, a - 0.1 * 0.2 * p0, atol=1e-6)


def test_training_metrics_are_those_of_the_last_epoch(digits):
    (x, y), _ = digits
    x, y = x[:250], y[:250]  # 250 = 7 batches of 32 and one of 26: weighting matters
    model = LOGREG()
    client = TorchClassifier(model, (x, y))
    res = client.train(initial_arrays(LOGREG, 0), {"epochs": 2, "lr": 0.2, "seed": 4})
    # Replay the last epoch by hand: same start point, same shuffling, same steps.
    first = client.train(initial_arrays(LOGREG, 0), {"epochs": 1, "lr": 0.2, "seed": 4})
    generator = torch.Generator().manual_seed(4)
    torch.randperm(250, generator=generator)
    perm = torch.randperm(250, generator=generator)
    set_arrays(model, first.arrays)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    loss_sum, correct = 0.0, 0
    for start in range(0, 250, 32):
        idx = perm[start : start + 32]
        xb, yb = torch.from_numpy(x)[idx], torch.from_numpy(y)[idx]
        optimizer.zero_grad()
        out = model(xb)
        loss = nn.functional.cross_entropy(out, yb)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(idx)
        correct += int((out.argmax(1) == yb).sum())
    assert res.metrics["loss"] == pytest.approx(loss_sum / 250, rel=1e-6)
    assert res.metrics["accuracy"] == correct / 250


def test_evaluate_matches_a_manual_computation(digits):
    train, (x, y) = digits
    model = batchnorm_cnn()
    client = TorchClassifier(model, train, (x, y))
    trained = client.train(initial_arrays(batchnorm_cnn, 0), {"lr": 0.1, "seed": 0}).arrays
    res = client.evaluate(trained, {"batch_size": 100})
    reference = batchnorm_cnn()
    reference.load_state_dict({k: torch.tensor(a) for k, a in zip(reference.state_dict(), trained)})
    reference.eval()
    with torch.no_grad():
        out = reference(torch.from_numpy(x))
        loss = nn.functional.cross_entropy(out, torch.from_numpy(y)).item()
        accuracy = (out.argmax(1).numpy() == y).mean()
    assert res.num_examples == len(y)
    assert res.loss == pytest.approx(loss, rel=1e-5)
    assert res.metrics == {"accuracy": pytest.approx(accuracy)}


def test_evaluate_without_test_data_is_a_clear_error(digits):
    train, _ = digits
    client = TorchClassifier(LOGREG(), train)
    with pytest.raises(DataError, match="no test data"):
        client.evaluate(initial_arrays(LOGREG, 0), {})


def test_local_evaluation_reports_the_trained_model_on_test_data(digits):
    train, test = digits
    client = TorchClassifier(MLP(), train, test)
    config = {"epochs": 2, "lr": 0.1, "seed": 0, "local_evaluation": True}
    res = client.train(initial_arrays(MLP, 0), config)
    check = client.evaluate(res.arrays, {})
    assert res.metrics["local_loss"] == pytest.approx(check.loss, rel=1e-5)
    assert res.metrics["local_accuracy"] == pytest.approx(check.metrics["accuracy"])
    without = client.train(initial_arrays(MLP, 0), {**config, "local_evaluation": False})
    assert "local_loss" not in without.metrics
    no_test = TorchClassifier(MLP(), train).train(initial_arrays(MLP, 0), config)
    assert set(no_test.metrics) == {"loss", "accuracy", "num_steps"}


class DigitsDataset(Dataset):
    """A generic map-style Dataset yielding (image tensor, int label)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return torch.from_numpy(self.x[i]), int(self.y[i])


def test_torch_dataset_input(digits):
    (x, y), (xt, yt) = digits
    client = TorchClassifier(LOGREG(), DigitsDataset(x, y), DigitsDataset(xt, yt))
    config = {"epochs": 3, "lr": 0.5, "seed": 0, "local_evaluation": True}
    res = client.train(initial_arrays(LOGREG, 0), config)
    assert res.num_examples == len(y)
    assert res.metrics["accuracy"] > 0.85
    ev = client.evaluate(res.arrays, {"batch_size": 50})
    assert ev.num_examples == len(yt)
    assert ev.metrics["accuracy"] > 0.85
    assert ev.loss == pytest.approx(res.metrics["local_loss"], rel=1e-5)
    # the same data as plain arrays gives the same evaluation
    arrays_ev = TorchClassifier(LOGREG(), (x, y), (xt, yt)).evaluate(res.arrays, {})
    assert arrays_ev.loss == pytest.approx(ev.loss, rel=1e-5)


def test_tensor_dataset_and_tensors_train_like_arrays(digits):
    (x, y), _ = digits
    config = {"epochs": 1, "lr": 0.1, "seed": 3}
    want = train_client(LOGREG, (x, y), config)[1]
    for data in (
        (torch.from_numpy(x), torch.from_numpy(y)),
        TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),
    ):
        got = train_client(LOGREG, data, config)[1]
        for a, b in zip(got.arrays, want.arrays):
            np.testing.assert_array_equal(a, b)


def test_labels_and_inputs_of_other_dtypes(digits):
    (x, y), _ = digits
    config = {"epochs": 1, "lr": 0.1, "seed": 3}
    want = train_client(LOGREG, (x, y), config)[1]
    got = train_client(LOGREG, (x.astype(np.float64), y.astype(np.int32)), config)[1]
    for a, b in zip(got.arrays, want.arrays):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(DataError, match="integer class indices"):
        train_client(LOGREG, (x, y.astype(np.float32)), config)
    with pytest.raises(DataError, match="labels y of shape"):
        train_client(LOGREG, (x, y[:-1]), config)


def test_read_only_arrays_train_without_warnings(digits):
    (x, y), _ = digits
    x, y = x.copy(), y.copy()
    x.flags.writeable = False
    y.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = train_client(LOGREG, (x, y), {"seed": 0})[1]
        arrays = [a.copy() for a in res.arrays]
        for a in arrays:
            a.flags.writeable = False
        model = LOGREG()
        set_arrays(model, arrays)
    for a, b in zip(get_arrays(model), arrays):
        np.testing.assert_array_equal(a, b)


def test_empty_training_data_is_a_data_error(digits):
    (x, y), _ = digits
    with pytest.raises(DataError, match="no training examples"):
        train_client(LOGREG, (x[:0], y[:0]), {})


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"optimizer": "rmsprop"}, "'optimizer' is 'rmsprop'; use one of sgd, adam"),
        ({"lr": 0.0}, "'lr' must be > 0"),
        ({"lr": -1}, "'lr' must be > 0"),
        ({"lr": "fast"}, "'lr' must be a number"),
        ({"epochs": 0}, "'epochs' must be >= 1"),
        ({"epochs": 1.5}, "'epochs' must be an integer"),
        ({"batch_size": True}, "'batch_size' must be an integer"),
        ({"momentum": 1.0}, r"'momentum' must be in \[0, 1\)"),
        ({"optimizer": "adam", "momentum": 0.9}, "applies to optimizer 'sgd' only"),
        ({"weight_decay": -0.1}, "'weight_decay' must be >= 0"),
        ({"seed": "zero"}, "'seed' must be an integer"),
        ({"local_evaluation": "yes"}, "'local_evaluation' must be true or false"),
    ],
)
def test_bad_train_config_is_a_config_error(digits, config, match):
    train, _ = digits
    client = TorchClassifier(LOGREG(), train)
    with pytest.raises(ConfigError, match=match):
        client.train(initial_arrays(LOGREG, 0), config)


def test_bad_evaluate_batch_size_is_a_config_error(digits):
    train, test = digits
    with pytest.raises(ConfigError, match="'batch_size' must be >= 1"):
        TorchClassifier(LOGREG(), train, test).evaluate(
            initial_arrays(LOGREG, 0), {"batch_size": 0}
        )


# --- classification_app, torch_evaluator, initial_arrays ----------------------------------


class SplitDigits:
    """A stand-in with the FederatedDataset interface: digits split into 3 clients."""

    num_classes = 10

    def __init__(self, train, test):
        self.train, self.test = train, test

    def client_train(self, cid):
        x, y = self.train
        return x[cid::3], y[cid::3]

    def client_test(self, cid):
        x, y = self.test
        return x[cid::3], y[cid::3]

    def num_train_examples(self, cid):
        return len(self.train[1][cid::3])


class CountingModelFn:
    """A picklable model_fn that counts how often it builds."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return LOGREG()


def test_classification_app_reuses_one_model_per_worker(digits):
    data = SplitDigits(*digits)
    fn = CountingModelFn()
    app = classification_app(fn, data)
    worker: dict = {}
    arrays = initial_arrays(LOGREG, 0)
    clients = [app(ClientContext(client_id=cid, seed=cid, worker=worker)) for cid in (0, 1, 2, 1)]
    assert fn.calls == 1
    assert all(c.model is clients[0].model for c in clients)
    res = clients[1].train(arrays, {"lr": 0.5, "seed": 1, "local_evaluation": True})
    assert res.num_examples == data.num_train_examples(1)
    assert clients[2].evaluate(res.arrays, {}).num_examples == len(data.client_test(2)[1])
    app(ClientContext(client_id=0, seed=0, worker={}))  # another worker builds its own
    assert fn.calls == 2


class NoTestSplit(SplitDigits):
    """Clients without a held-out part: client_test returns empty arrays."""

    def client_test(self, cid):
        x, y = self.test
        return x[:0], y[:0]


def test_classification_app_client_without_test_examples(digits):
    app = classification_app(LOGREG, NoTestSplit(*digits))
    client = app(ClientContext(client_id=0, seed=0))
    res = client.train(initial_arrays(LOGREG, 0), {"seed": 0, "local_evaluation": True})
    assert set(res.metrics) == {"loss", "accuracy", "num_steps"}
    with pytest.raises(DataError, match="no test data"):
        client.evaluate(res.arrays, {})


def test_classification_app_results_do_not_depend_on_the_reused_model(digits):
    data = SplitDigits(*digits)
    app = classification_app(MLP, data)
    worker: dict = {}
    arrays = initial_arrays(MLP, 0)
    config = {"epochs": 1, "lr": 0.1, "seed": 5}
    first = app(ClientContext(client_id=0, seed=0, worker=worker)).train(arrays, config)
    app(ClientContext(client_id=1, seed=0, worker=worker)).train(arrays, config)
    again = app(ClientContext(client_id=0, seed=0, worker=worker)).train(arrays, config)
    for a, b in zip(first.arrays, again.arrays):
        np.testing.assert_array_equal(a, b)


def test_classification_app_pickles_and_rebuilds_for_another_model(digits):
    data = SplitDigits(*digits)
    app = pickle.loads(pickle.dumps(classification_app(MLP, data)))
    worker: dict = {}
    model = app(ClientContext(client_id=0, seed=0, worker=worker)).model
    again = pickle.loads(pickle.dumps(classification_app(MLP, data)))
    assert again(ClientContext(client_id=1, seed=0, worker=worker)).model is model
    other = classification_app(LOGREG, data)  # a different architecture: not reused
    assert other(ClientContext(client_id=1, seed=0, worker=worker)).model is not model
    res = app(ClientContext(client_id=2, seed=0, worker=worker)).train(
        initial_arrays(MLP, 0), {"seed": 0}
    )
    assert len(res.arrays) == 4


def test_torch_evaluator_matches_client_evaluate_and_pickles(digits):
    train, (x, y) = digits
    arrays = TorchClassifier(MLP(), train).train(initial_arrays(MLP, 0), {"seed": 0}).arrays
    fn = CountingModelFn()
    evaluate = torch_evaluator(fn, x, y, batch_size=128)
    loss, metrics = evaluate(initial_arrays(LOGREG, 0))
    assert fn.calls == 1
    evaluate(initial_arrays(LOGREG, 1))
    assert fn.calls == 1  # built once, reused
    clone = pickle.loads(pickle.dumps(evaluate))
    assert clone(initial_arrays(LOGREG, 0)) == (loss, metrics)

    mlp_eval = torch_evaluator(MLP, x, y)
    loss, metrics = mlp_eval(arrays)
    expected = TorchClassifier(MLP(), train, (x, y)).evaluate(arrays, {})
    assert loss == pytest.approx(expected.loss, rel=1e-5)
    assert metrics == {"accuracy": pytest.approx(expected.metrics["accuracy"])}
    with pytest.raises(DataError, match="same non-zero length"):
        torch_evaluator(MLP, x, y[:-1])


def test_initial_arrays_are_seeded_and_leave_the_global_rng_alone():
    torch.manual_seed(99)
    expected = torch.rand(2)
    torch.manual_seed(99)
    a = initial_arrays(MLP, 0)
    assert torch.equal(torch.rand(2), expected)
    b = initial_arrays(MLP, 0)
    c = initial_arrays(MLP, 1)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[0], c[0])
    torch.manual_seed(0)
    np.testing.assert_array_equal(a[0], get_arrays(MLP())[0])


def test_model_fn_must_return_a_module():
    with pytest.raises(ConfigError, match="must return a torch.nn.Module"):
        initial_arrays(lambda: "not a model", 0)


def test_seed_cnn_trains_on_padded_digits(digits):
    (x, y), (xt, yt) = digits
    pad = ((0, 0), (0, 0), (2, 2), (2, 2))  # 8x8 -> 12x12, big enough for the cnn
    cnn = model_fn("cnn", (1, 12, 12), 10)
    client = TorchClassifier(cnn(), (np.pad(x, pad), y), (np.pad(xt, pad), yt))
    arrays = initial_arrays(cnn, 0)
    assert len(arrays) == 8
    res = client.train(arrays, {"epochs": 3, "lr": 0.05, "momentum": 0.9, "seed": 0})
    before, after = client.evaluate(arrays, {}), client.evaluate(res.arrays, {})
    assert after.loss < before.loss
    assert after.metrics["accuracy"] > 0.8
