"""The JAX/Flax adapter: Arrays, the compiled step, FedProx, SCAFFOLD, config runs."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
import flax.linen as nn  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from pollinate import config  # noqa: E402
from pollinate.errors import ConfigError  # noqa: E402
from pollinate.experiment import build_data, run_experiment  # noqa: E402
from pollinate.frameworks.base import framework_parts, get_framework  # noqa: E402
from pollinate.frameworks.common import SCAFFOLD_STATE_KEY, FrameworkClient  # noqa: E402
from pollinate.frameworks.jax import FlaxModel, JaxRunner, build_model  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)  # NCHW, as clients get it
    return x[:300], bunch.target[:300].astype(np.int64)


class BatchNormNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(16)(x.reshape((x.shape[0], -1)))
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(10)(nn.relu(x))


def mlp() -> FlaxModel:
    return build_model("mlp", (8, 8, 1), 10, (16,))


def test_arrays_round_trip_keeps_batchnorm_statistics(digits):
    runner = JaxRunner(FlaxModel(BatchNormNet(), (8, 8, 1)), seed=0)
    client = FrameworkClient(runner, "jax", digits, None)
    res = client.train(runner.get_arrays(), {"epochs": 1, "batch_size": 32, "lr": 0.1})
    variables = runner.variables
    assert set(variables) == {"params", "batch_stats"}
    assert len(res.arrays) == len(jax.tree_util.tree_leaves(variables)) == 8
    assert runner.trainable().count(False) == 2  # BatchNorm's mean and var
    mean = variables["batch_stats"]["BatchNorm_0"]["mean"]
    assert np.abs(np.asarray(mean)).sum() > 0  # moved by training

    other = JaxRunner(FlaxModel(BatchNormNet(), (8, 8, 1)), seed=1)
    other.set_arrays(res.arrays)
    for a, b in zip(other.get_arrays(), res.arrays):
        np.testing.assert_array_equal(a, b)
    x = np.asarray(digits[0][:5]).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(
        runner.module.apply(runner.variables, x), other.module.apply(other.variables, x)
    )


def test_training_lowers_the_loss_with_one_compiled_step(digits):
    x, y = digits
    runner = JaxRunner(mlp())
    arrays = runner.get_arrays()
    config_ = {"epochs": 2, "batch_size": 16, "lr": 0.1, "report_initial_loss": True}
    for size in (100, 170, 300):  # clients of different sizes (300: a scanned chunk too)
        res = FrameworkClient(runner, "jax", (x[:size], y[:size]), None).train(arrays, config_)
        assert res.metrics["loss"] < res.metrics["initial_loss"]
        assert res.metrics["num_steps"] == 2 * -(-size // 16)
    ((_, step),) = runner._train_steps.values()
    assert step._cache_size() == 1  # padded batches and chunks: one compilation serves all


def test_scanned_chunks_take_the_same_steps_as_single_calls(digits, monkeypatch):
    """A chunk of batches in one compiled call (lax.scan; the last chunk padded with batches
    that do not train) trains as one call per batch."""
    from pollinate.frameworks import jax as adapter

    x, y = digits
    runner = JaxRunner(mlp())
    arrays = runner.get_arrays()
    config_ = {"epochs": 2, "batch_size": 16, "lr": 0.1, "momentum": 0.9, "seed": 5}
    chunked = FrameworkClient(runner, "jax", (x, y), None).train(arrays, config_)
    monkeypatch.setattr(adapter, "CHUNK", 1)  # one call per batch
    single = FrameworkClient(JaxRunner(mlp()), "jax", (x, y), None).train(arrays, config_)
    assert chunked.metrics["num_steps"] == single.metrics["num_steps"] == 2 * 19
    assert chunked.metrics["loss"] == pytest.approx(single.metrics["loss"], rel=1e-5)
    for a, b in zip(chunked.arrays, single.arrays):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _distance(a, b) -> float:
    return float(sum(np.sum((p - q) ** 2) for p, q in zip(a, b)))


def test_fedprox_keeps_the_model_near_the_global_one(digits):
    runner = JaxRunner(mlp())
    arrays = runner.get_arrays()
    client = FrameworkClient(runner, "jax", digits, None)
    base = {"epochs": 2, "lr": 0.1, "seed": 3}
    free = client.train(arrays, base).arrays
    prox = client.train(arrays, {**base, "proximal_mu": 5.0}).arrays
    assert _distance(prox, arrays) < 0.5 * _distance(free, arrays)


def test_scaffold_correction_and_client_variate(digits):
    runner = JaxRunner(mlp())
    arrays = runner.get_arrays()
    c = [np.full_like(a, 0.05) for a in arrays]
    base = {"epochs": 1, "lr": 0.1, "seed": 3}
    plain = FrameworkClient(runner, "jax", digits, None).train(arrays, base)

    state: dict = {}
    res = FrameworkClient(runner, "jax", digits, None, state=state).train(
        arrays + c, {**base, "scaffold": True}
    )
    n = len(arrays)
    y, delta = res.arrays[:n], res.arrays[n:]
    k, lr = res.metrics["num_steps"], 0.1
    for xk, yk, ck, dk, ci in zip(arrays, y, c, delta, state[SCAFFOLD_STATE_KEY]):
        expected = -ck + (xk - yk) / (k * lr)  # c_i was 0
        np.testing.assert_allclose(ci, expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(dk, expected, rtol=1e-4, atol=1e-5)
    assert _distance(y, plain.arrays) > 1e-6  # the correction changed the steps

    # with c_i = c the correction is zero: exactly the plain steps
    state = {SCAFFOLD_STATE_KEY: c}
    same = FrameworkClient(runner, "jax", digits, None, state=state).train(
        arrays + c, {**base, "scaffold": True}
    )
    for a, b in zip(same.arrays[:n], plain.arrays):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_cuda_is_a_clear_error_without_a_gpu():
    framework = get_framework("jax")
    if any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("this machine has a GPU")
    assert framework.resolve_device("auto") == "cpu"
    with pytest.raises(ConfigError, match="'cuda' but jax sees no CUDA GPU"):
        framework.resolve_device("cuda")


def test_check_names_the_mismatch(tmp_path, monkeypatch):
    (tmp_path / "flaxmods.py").write_text(
        "import flax.linen as nn\n"
        "class Three(nn.Module):\n"
        "    @nn.compact\n"
        "    def __call__(self, x):\n"
        "        return nn.Dense(3)(x.reshape((x.shape[0], -1)))\n"
        "def three():\n"
        "    return Three()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = config.load(
        overrides=["model.framework=jax", "model.name=flaxmods:three", f"run.output={tmp_path}"]
    )
    with pytest.raises(ConfigError, match=r"shape \(1, 8, 8\).*10 classes.*\(8, 3\)"):
        framework_parts(cfg, build_data(cfg))


@pytest.mark.slow
def test_config_run_sequential_equals_process(tmp_path):
    runs = {}
    for backend in ("sequential", "process"):
        cfg = config.load(
            overrides=[
                "model.framework=jax",
                "model.hidden=[32]",
                "run.rounds=2",
                "data.num_clients=3",
                "train.epochs=1",
                "run.deterministic=true",
                f"simulation.backend={backend}",
                f"run.output={tmp_path / backend}",
            ]
        )
        runs[backend] = run_experiment(cfg, quiet=True)
    seq, proc = runs["sequential"], runs["process"]
    strip = [{k: v for k, v in r.items() if k != "wall_s"} for r in seq.history.rounds]
    assert strip == [{k: v for k, v in r.items() if k != "wall_s"} for r in proc.history.rounds]
    for a, b in zip(seq.arrays, proc.arrays):
        np.testing.assert_array_equal(a, b)
    accuracy = [r["centralized"]["accuracy"] for r in seq.history.rounds]
    assert accuracy[-1] > 0.6
