"""The Keras 3 adapter (tensorflow backend here): Arrays, fit, a user's compiled model,
FedProx, SCAFFOLD, config runs. One process imports tensorflow for the whole file."""

from __future__ import annotations

import math

import numpy as np
import pytest

keras = pytest.importorskip("keras")
from sklearn.datasets import load_digits  # noqa: E402

from pollinate import config  # noqa: E402
from pollinate.errors import ConfigError  # noqa: E402
from pollinate.experiment import build_data, run_experiment  # noqa: E402
from pollinate.frameworks.base import framework_parts, get_framework  # noqa: E402
from pollinate.frameworks.common import SCAFFOLD_STATE_KEY, FrameworkClient  # noqa: E402
from pollinate.frameworks.keras import KerasRunner, build_model  # noqa: E402
from tests.waiting import patience  # noqa: E402

BLOG_MODULE = """
import keras
from keras.layers import Dense, Flatten, Input
from tests.waiting import patience

def create_model():
    model = keras.Sequential([Input(shape=(8, 8, 1)), Flatten(), Dense(16, activation="relu"),
                              Dense(10, activation="softmax")])
    model.compile(optimizer=keras.optimizers.SGD(), loss="categorical_crossentropy",
                  metrics=["accuracy"])
    return model

def batchnorm(input_shape, num_classes):
    return keras.Sequential([Input(shape=input_shape), Flatten(), Dense(16),
                             keras.layers.BatchNormalization(), Dense(num_classes,
                             activation="softmax")])

def wrong_input():
    return keras.Sequential([Input(shape=(28, 28, 1)), Flatten(), Dense(10, activation="softmax")])
"""


@pytest.fixture(scope="module")
def digits():
    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)  # NCHW, as clients get it
    return x[:300], bunch.target[:300].astype(np.int64)


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    (tmp_path / "kerasmods.py").write_text(BLOG_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))


def parts_for(tmp_path, *keys: str):
    cfg = config.load(
        overrides=["model.framework=keras", "data.num_clients=3", f"run.output={tmp_path}", *keys]
    )
    return framework_parts(cfg, build_data(cfg))


def test_arrays_round_trip_includes_batchnorm_statistics(tmp_path, user_models, digits):
    parts = parts_for(tmp_path, "model.name=kerasmods:batchnorm")
    runner = KerasRunner(parts.model_fn())
    assert len(parts.initial_arrays) == len(runner.model.weights) == 8
    assert runner.trainable().count(False) == 2  # moving mean and variance
    res = FrameworkClient(runner, "keras", digits, None).train(parts.initial_arrays, {"lr": 0.1})
    paths = [v.path for v in runner.model.weights]
    moving_mean = res.arrays[next(i for i, p in enumerate(paths) if "moving_mean" in p)]
    assert np.abs(moving_mean).sum() > 0
    other = KerasRunner(parts.model_fn())
    other.set_arrays(res.arrays)
    for a, b in zip(other.get_arrays(), res.arrays):
        np.testing.assert_array_equal(a, b)
    x = digits[0][:4].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(
        other.model.predict(x, verbose=0), runner.model.predict(x, verbose=0)
    )


def _dropout_model() -> keras.Model:
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input(shape=(8, 8, 1)),
            layers.Flatten(),
            layers.Dense(32, activation="relu"),
            layers.Dropout(0.5),
            layers.Dense(10, activation="softmax"),
        ]
    )


def test_dropout_is_seeded_by_the_task_not_by_what_the_worker_ran_before(digits):
    runner = KerasRunner(_dropout_model())
    arrays = runner.get_arrays()
    client = FrameworkClient(runner, "keras", digits, None)
    config_ = {"epochs": 1, "lr": 0.1, "seed": 3}
    first = client.train(arrays, config_)
    client.train(arrays, {**config_, "seed": 4})  # another task in between
    again = client.train(arrays, config_)
    elsewhere = FrameworkClient(KerasRunner(_dropout_model()), "keras", digits, None)
    fresh = elsewhere.train(arrays, config_)  # another worker's model
    for a, b, c in zip(first.arrays, again.arrays, fresh.arrays):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-7)
    assert first.metrics["loss"] == pytest.approx(fresh.metrics["loss"], rel=1e-6)


def test_builtin_cnn_is_the_blog_model():
    model = build_model("cnn", (28, 28, 1), 10, ())
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == [
        "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "Flatten", "Dense", "Dense"
    ]  # fmt: skip
    assert model.count_params() == 32 * 9 + 32 + 64 * 32 * 9 + 64 + 1600 * 128 + 128 + 1290
    with pytest.raises(ConfigError, match="at least 10x10"):
        build_model("cnn", (8, 8, 1), 10, ())


def test_training_lowers_the_loss_and_counts_steps(tmp_path, digits):
    parts = parts_for(tmp_path, "model.name=mlp", "model.hidden=[16]")
    runner = KerasRunner(parts.model_fn())
    client = FrameworkClient(runner, "keras", digits, digits)
    config_ = {"epochs": 2, "batch_size": 32, "lr": 0.1, "report_initial_loss": True}
    res = client.train(parts.initial_arrays, {**config_, "local_evaluation": True})
    assert res.metrics["loss"] < res.metrics["initial_loss"]
    assert res.metrics["num_steps"] == 2 * math.ceil(300 / 32)  # optimizer state reset per task
    assert 0 <= res.metrics["local_accuracy"] <= 1
    again = client.train(parts.initial_arrays, config_)
    assert again.metrics["num_steps"] == res.metrics["num_steps"]
    for a, b in zip(again.arrays, res.arrays):  # same seed, fresh optimizer: same result
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    adam = client.train(parts.initial_arrays, {**config_, "optimizer": "adam", "lr": 0.01})
    assert isinstance(runner.model.optimizer, keras.optimizers.Adam)
    assert adam.metrics["loss"] < adam.metrics["initial_loss"]


def test_a_compiled_user_model_keeps_its_optimizer_and_gets_one_hot_labels(
    tmp_path, user_models, digits
):
    parts = parts_for(tmp_path, "model.name=kerasmods:create_model")  # takes no arguments
    runner = KerasRunner(parts.model_fn())
    assert runner.one_hot and not runner.owns_compile
    res = FrameworkClient(runner, "keras", digits, None).train(
        parts.initial_arrays, {"epochs": 3, "lr": 0.5, "report_initial_loss": True}
    )
    assert float(runner.model.optimizer.learning_rate) == pytest.approx(0.01)  # SGD()'s own
    assert res.metrics["loss"] < res.metrics["initial_loss"]
    loss, metrics = parts.evaluator(res.arrays)
    assert 0 < loss and 0 <= metrics["accuracy"] <= 1


def test_check_names_the_data_shape(tmp_path, user_models):
    with pytest.raises(ConfigError, match=r"shape \(1, 8, 8\).*10 classes.*running it failed"):
        parts_for(tmp_path, "model.name=kerasmods:wrong_input")


def _distance(a, b) -> float:
    return float(sum(np.sum((p - q) ** 2) for p, q in zip(a, b)))


def test_fedprox_and_scaffold_terms(tmp_path, digits):
    parts = parts_for(tmp_path, "model.name=logreg")
    runner = KerasRunner(parts.model_fn())
    arrays = parts.initial_arrays
    base = {"epochs": 1, "lr": 0.1, "momentum": 0.0, "seed": 3}
    client = FrameworkClient(runner, "keras", digits, None)
    plain = client.train(arrays, base)
    prox = client.train(arrays, {**base, "proximal_mu": 5.0})
    assert _distance(prox.arrays, arrays) < 0.5 * _distance(plain.arrays, arrays)
    assert prox.metrics["loss"] == pytest.approx(plain.metrics["loss"], rel=0.2)  # data loss
    # the terms stay installed with zero weight: plain training is unchanged
    again = client.train(arrays, base)
    for a, b in zip(again.arrays, plain.arrays):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    c = [np.full_like(a, 0.05) for a in arrays]
    state: dict = {}
    res = FrameworkClient(runner, "keras", digits, None, state=state).train(
        arrays + c, {**base, "scaffold": True}
    )
    n, k = len(arrays), res.metrics["num_steps"]
    for xk, yk, ck, ci in zip(arrays, res.arrays[:n], c, state[SCAFFOLD_STATE_KEY]):
        np.testing.assert_allclose(ci, -ck + (xk - yk) / (k * 0.1), rtol=1e-3, atol=1e-4)
    assert _distance(res.arrays[:n], plain.arrays) > 1e-6
    same = FrameworkClient(runner, "keras", digits, None, state={SCAFFOLD_STATE_KEY: c}).train(
        arrays + c, {**base, "scaffold": True}
    )
    for a, b in zip(same.arrays[:n], plain.arrays):  # c_i = c: no correction
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_cuda_is_a_clear_error_without_a_gpu():
    framework = get_framework("keras")
    from pollinate.frameworks.keras import gpu_count

    if gpu_count():
        pytest.skip("this machine has a GPU")
    assert framework.resolve_device("auto") == "cpu"
    with pytest.raises(ConfigError, match="'cuda' but keras \\(tensorflow\\) sees no CUDA GPU"):
        framework.resolve_device("cuda")


@pytest.mark.slow
def test_config_run_sequential_equals_process(tmp_path):
    runs = {}
    for backend in ("sequential", "process"):
        cfg = config.load(
            overrides=[
                "model.framework=keras",
                "model.hidden=[32]",
                "run.rounds=2",
                "data.num_clients=3",
                "train.epochs=1",
                "run.deterministic=true",
                "simulation.threads_per_worker=1",
                f"simulation.backend={backend}",
                f"run.output={tmp_path / backend}",
            ]
        )
        runs[backend] = run_experiment(cfg, quiet=True)
    seq, proc = runs["sequential"].history.rounds, runs["process"].history.rounds
    for a, b in zip(seq, proc):
        assert a["clients"].keys() == b["clients"].keys()
        assert a["centralized"]["accuracy"] == pytest.approx(b["centralized"]["accuracy"], abs=0.01)
        assert a["train"]["metrics"]["num_steps"] == b["train"]["metrics"]["num_steps"]
    assert seq[-1]["centralized"]["accuracy"] > 0.6


JAX_BACKEND_SCRIPT = """
import numpy as np, keras
from sklearn.datasets import load_digits
from pollinate.frameworks.common import SCAFFOLD_STATE_KEY, FrameworkClient
from pollinate.frameworks.keras import KerasRunner, build_model

assert keras.backend.backend() == "jax"
bunch = load_digits()
x = (bunch.data / 16).astype(np.float32).reshape(-1, 1, 8, 8)[:200]
y = bunch.target[:200].astype(np.int64)
runner = KerasRunner(build_model("logreg", (8, 8, 1), 10, ()))
arrays = runner.get_arrays()
client = FrameworkClient(runner, "keras", (x, y), None)
base = {"epochs": 1, "lr": 0.1, "momentum": 0.0, "seed": 3}
plain = client.train(arrays, base)
prox = client.train(arrays, {**base, "proximal_mu": 5.0})
dist = lambda u, v: sum(float(np.sum((a - b) ** 2)) for a, b in zip(u, v))
assert dist(prox.arrays, arrays) < 0.5 * dist(plain.arrays, arrays)
c = [np.full_like(a, 0.05) for a in arrays]
same = FrameworkClient(runner, "keras", (x, y), None, state={SCAFFOLD_STATE_KEY: c}).train(
    arrays + c, {**base, "scaffold": True})
assert dist(same.arrays[: len(arrays)], plain.arrays) < 1e-10
print("ok", plain.metrics["num_steps"])
"""


@pytest.mark.slow
def test_the_jax_backend_trains_with_the_strategy_terms(tmp_path):
    pytest.importorskip("jax")
    import os
    import subprocess
    import sys

    env = {**os.environ, "KERAS_BACKEND": "jax"}
    proc = subprocess.run(
        [sys.executable, "-c", JAX_BACKEND_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=patience(240),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ok", "7"]  # 200 examples in batches of 32
