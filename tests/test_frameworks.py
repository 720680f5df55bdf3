"""The framework interface, devices, boosted-trees merging, scikit-learn and XGBoost."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pollinate import config
from pollinate.errors import ConfigError, MissingDependencyError, UpdateRejected
from pollinate.experiment import build_data, run_experiment
from pollinate.frameworks import base
from pollinate.frameworks.common import FrameworkClient, TrainSettings, scaffold_client_update
from pollinate.frameworks.devices import check_device, resolve_device, worker_env, worker_gpus
from pollinate.strategy.xgb import (
    BoostedTreesBagging,
    BoostedTreesCyclic,
    cyclic_client,
    merge_trees,
    to_arrays,
)


def small(tmp_path, backend: str, *extra: str) -> config.RunConfig:
    return config.load(
        overrides=[
            "run.rounds=2",
            "data.num_clients=3",
            "train.epochs=1",
            "run.deterministic=true",
            f"simulation.backend={backend}",
            f"run.output={tmp_path / backend}",
            *extra,
        ]
    )


def comparable(result) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in result.history.rounds]


def client_for(framework: str, model: str, tmp_path, cid: int = 0, **model_keys):
    """A FrameworkClient of ``framework`` on client ``cid`` of 3-client digits."""
    extra = [f"model.{k}={v}" for k, v in model_keys.items()]
    if framework == "xgboost":  # boosted trees go with the boosted-trees strategies
        extra.append("strategy.name=fedxgb_bagging")
    cfg = small(
        tmp_path, "sequential", f"model.framework={framework}", f"model.name={model}", *extra
    )
    data = build_data(cfg)
    parts = base.framework_parts(cfg, data)
    client = parts.client_fn(_context(cid, seed=7))
    return client, parts


def _context(cid: int, seed: int = 0, state=None, worker=None):
    from pollinate.client import ClientContext

    return ClientContext(cid, seed=seed, state=state or {}, worker={} if worker is None else worker)


# --- the interface ----------------------------------------------------------------------------


def test_unknown_framework_names_the_choices():
    with pytest.raises(ConfigError, match="unknown framework 'caffe'.*torch, keras, jax"):
        base.get_framework("caffe")
    with pytest.raises(ConfigError, match="model.framework = 'caffe'.*torch, keras"):
        config.load(overrides=["model.framework=caffe"])


def test_missing_framework_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(
        base.FRAMEWORKS, "nothing", ("pollinate.frameworks._no_such_module", "nothing", "nothing")
    )
    with pytest.raises(MissingDependencyError, match=r"pip install 'pollinate\[nothing\]'"):
        base.get_framework("nothing")


def test_user_function_receives_only_the_arguments_it_takes():
    assert base.accepted(lambda: None, {"input_shape": (1,), "num_classes": 2}) == {}
    assert base.accepted(lambda num_classes: None, {"input_shape": (1,), "num_classes": 2}) == {
        "num_classes": 2
    }
    with pytest.raises(ConfigError, match="cannot import module 'no_such_pkg.models'"):
        base.import_function("no_such_pkg.models:make")


def test_torch_check_names_the_data_shape_and_classes(tmp_path, monkeypatch):
    (tmp_path / "wrong_torch.py").write_text(
        "import torch.nn as nn\n"
        "def five():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 5))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = small(tmp_path, "sequential", "model.name=wrong_torch:five")
    with pytest.raises(ConfigError, match=r"shape \(1, 8, 8\).*10 classes.*returns \(8, 5\)"):
        base.framework_parts(cfg, build_data(cfg))


def test_train_settings_read_the_strategy_keys():
    s = TrainSettings.from_config(
        {"proximal_mu": 0.1, "scaffold": True, "report_initial_loss": True}, seed=5
    )
    assert (s.proximal_mu, s.scaffold, s.report_initial_loss, s.seed) == (0.1, True, True, 5)
    with pytest.raises(ConfigError, match="proximal_mu"):
        TrainSettings.from_config({"proximal_mu": -1.0})


def test_scaffold_client_update_by_hand():
    x = [np.array([1.0, 2.0]), np.array([5.0])]
    y = [np.array([0.5, 1.0]), np.array([7.0])]
    c = [np.array([0.1, 0.2]), np.array([1.0])]
    c_i = [np.array([0.0, 0.4]), np.array([3.0])]
    new, delta = scaffold_client_update(x, y, c, c_i, steps=5, lr=0.1, trainable=[True, False])
    # c_i+ = c_i - c + (x - y) / (K lr) = [0 - .1 + .5/.5, .4 - .2 + 1/.5] = [0.9, 2.2]
    np.testing.assert_allclose(new[0], [0.9, 2.2])
    np.testing.assert_allclose(delta[0], [0.9, 1.8])
    np.testing.assert_array_equal(new[1], [0.0])  # not trained by gradient: no variate


# --- devices ----------------------------------------------------------------------------------


def test_device_settings_are_checked():
    assert check_device("cuda:3") == "cuda:3"
    with pytest.raises(ConfigError, match="auto | cpu | cuda"):
        check_device("gpu")
    with pytest.raises(ConfigError, match="train.device = 'tpu'"):
        config.load(overrides=["train.device=tpu"])
    with pytest.raises(ConfigError, match="gpus_per_worker pins each worker"):
        config.load(overrides=["train.device=cuda:1", "simulation.gpus_per_worker=1"])


def test_resolve_device():
    assert resolve_device("auto", "torch", gpus=0) == "cpu"
    assert resolve_device("auto", "torch", gpus=2) == "cuda:0"
    assert resolve_device("auto", "torch", gpus=0, mps=True) == "mps"
    assert resolve_device("cuda", "torch", gpus=1) == "cuda:0"
    with pytest.raises(ConfigError, match="'cuda:2' but torch sees only 2"):
        resolve_device("cuda:2", "torch", gpus=2)
    with pytest.raises(ConfigError, match="sees no Apple GPU"):
        resolve_device("mps", "jax", gpus=0)


def test_cuda_on_this_machine_is_a_clear_error():
    torch = pytest.importorskip("torch")
    framework = base.get_framework("torch")
    if torch.cuda.is_available():
        assert framework.resolve_device("cuda") == "cuda:0"
        return
    assert framework.resolve_device("auto") == "cpu"
    with pytest.raises(ConfigError, match="'cuda' but torch sees no CUDA GPU.*device = 'cpu'"):
        framework.resolve_device("cuda")
    sklearn = base.get_framework("sklearn")
    with pytest.raises(ConfigError, match="scikit-learn runs on the CPU only"):
        sklearn.resolve_device("cuda")


RUN_KEYS = {  # a model of each framework for a digits run
    "torch": ["model.name=mlp"],
    "keras": ["model.name=mlp"],
    "jax": ["model.name=mlp"],
    "sklearn": ["model.name=sgd"],
    "xgboost": ["model.name=gbtree", "strategy.name=fedxgb_bagging"],
}


@pytest.mark.parametrize("framework", list(RUN_KEYS))
def test_a_run_asking_for_cuda_without_one_stops_with_the_fix(tmp_path, framework):
    """``[train] device = "cuda"`` on a machine (or a build) without CUDA stops the run
    before any training, naming the framework, what it sees and the setting to use."""
    fw = base.get_framework(framework)
    cfg = small(
        tmp_path,
        "sequential",
        f"model.framework={framework}",
        "train.device=cuda",
        *RUN_KEYS[framework],
    )
    if fw.resolve_device("auto") != "cpu":  # this machine has a GPU the framework sees
        assert fw.resolve_device("cuda") == "cuda:0"
        return
    seen = {"sklearn": "scikit-learn runs on the CPU only"}.get(
        framework, f"{framework}.* sees no CUDA GPU"
    )
    with pytest.raises(ConfigError, match=rf"train.device = 'cuda'.*{seen}.*device = 'cpu'"):
        run_experiment(cfg, quiet=True)
    assert not (tmp_path / "sequential" / "history.json").exists()


def test_workers_are_pinned_to_gpus_round_robin():
    gpus = ["0", "1", "2", "3"]
    assert [worker_gpus(i, 0.5, gpus) for i in range(6)] == [
        ["0"], ["0"], ["1"], ["1"], ["2"], ["2"]
    ]  # fmt: skip
    assert [worker_gpus(i, 1, gpus) for i in range(5)] == [["0"], ["1"], ["2"], ["3"], ["0"]]
    assert worker_gpus(1, 2, gpus) == ["2", "3"]
    assert worker_env(1, 0.25, ["4", "7"]) == {"CUDA_VISIBLE_DEVICES": "4"}
    assert worker_env(3, 0.0, []) == {}
    with pytest.raises(ConfigError, match="no GPU is visible"):
        worker_gpus(0, 0.5, [])
    with pytest.raises(ConfigError, match="only 2 GPU"):
        worker_gpus(0, 3, ["0", "1"])


# --- boosted trees: JSON merging ------------------------------------------------------------


def _model(trees: int, per_iteration: int = 2, num_class: int = 2) -> bytes:
    """A hand-made XGBoost JSON model with ``trees`` trees."""
    return json.dumps(
        {
            "learner": {
                "learner_model_param": {"num_class": str(num_class), "num_feature": "3"},
                "objective": {"name": "multi:softprob"},
                "gradient_booster": {
                    "name": "gbtree",
                    "model": {
                        "gbtree_model_param": {"num_parallel_tree": "1", "num_trees": str(trees)},
                        "iteration_indptr": list(range(0, trees + 1, per_iteration)),
                        "tree_info": [i % per_iteration for i in range(trees)],
                        "trees": [{"id": i, "tag": f"t{trees}-{i}"} for i in range(trees)],
                    },
                },
            }
        }
    ).encode()


def test_merge_appends_trees_and_fixes_ids_and_indptr():
    merged = json.loads(merge_trees(_model(2), [_model(4), _model(2)]))
    model = merged["learner"]["gradient_booster"]["model"]
    assert [t["id"] for t in model["trees"]] == list(range(8))
    assert [t["tag"] for t in model["trees"]] == [
        "t2-0", "t2-1", "t4-0", "t4-1", "t4-2", "t4-3", "t2-0", "t2-1"
    ]  # fmt: skip
    assert model["iteration_indptr"] == [0, 2, 4, 6, 8]
    assert model["tree_info"] == [0, 1] * 4
    assert model["gbtree_model_param"]["num_trees"] == "8"


def test_merge_rejects_another_problem_and_cyclic_takes_one_client():
    with pytest.raises(UpdateRejected, match="num_class = 3, the global model 2"):
        merge_trees(_model(2), [_model(3, per_iteration=3, num_class=3)])
    with pytest.raises(UpdateRejected, match="not an XGBoost JSON model"):
        BoostedTreesBagging().merge(to_arrays(_model(2)), [to_arrays(b"{}")], [1.0])
    acc = BoostedTreesCyclic().start(to_arrays(_model(2)))
    acc.add(to_arrays(_model(2)), 10)
    with pytest.raises(UpdateRejected, match="cyclic"):
        acc.add(to_arrays(_model(2)), 10)
    assert (acc.count, acc.total_weight) == (1, 10.0)
    assert [cyclic_client(r, [7, 3, 5]) for r in range(1, 6)] == [3, 5, 7, 3, 5]


def test_bagging_predicts_the_sum_of_the_trees():
    xgb = pytest.importorskip("xgboost")
    from pollinate.frameworks.xgboost import BoosterSpec, empty_model

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(int) + (x[:, 2] > 1)
    spec = BoosterSpec(4, 3, max_depth=2)
    params = spec.params()
    glob = xgb.Booster(params)
    glob.load_model(bytearray(empty_model(spec)))
    glob = xgb.train(params, xgb.DMatrix(x, label=y), 2, xgb_model=glob)
    updates, margins = [], []
    for k in range(2):
        part = slice(100 * k, 100 * (k + 1))
        local = xgb.train(params, xgb.DMatrix(x[part], label=y[part]), 3, xgb_model=glob.copy())
        new = local[2:5]
        updates.append(to_arrays(new.save_raw("json")))
        margins.append(new.predict(xgb.DMatrix(x), output_margin=True) - 0.5)  # minus base score
    merged = BoostedTreesBagging().merge(to_arrays(glob.save_raw("json")), updates, [1, 1])
    booster = xgb.Booster(params)
    booster.load_model(bytearray(merged[0].tobytes()))
    assert booster.num_boosted_rounds() == 2 + 3 + 3
    expected = glob.predict(xgb.DMatrix(x), output_margin=True) + sum(margins)
    np.testing.assert_allclose(
        booster.predict(xgb.DMatrix(x), output_margin=True), expected, atol=1e-5
    )


# --- scikit-learn -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sgd", "logreg", "mlp"])
def test_sklearn_round_trip_and_training_lowers_the_loss(tmp_path, name):
    pytest.importorskip("sklearn")
    client, parts = client_for("sklearn", name, tmp_path, hidden="[16]")
    arrays = parts.initial_arrays
    assert all(a.dtype == np.float64 for a in arrays)
    optimizer = "adam" if name == "mlp" else "sgd"
    config = {"epochs": 3, "lr": 0.02, "optimizer": optimizer, "report_initial_loss": True}
    res = client.train(arrays, config)
    assert res.metrics["loss"] < res.metrics["initial_loss"]
    assert res.metrics["num_steps"] >= 3
    assert res.num_examples == len(client.train_data[1])
    runner = client.runner
    runner.set_arrays(res.arrays)
    for a, b in zip(runner.get_arrays(), res.arrays):
        np.testing.assert_array_equal(a, b)
    loss, metrics = parts.evaluator(res.arrays)
    assert metrics["accuracy"] > 0.5 and loss < res.metrics["initial_loss"]


def test_sgd_classifier_takes_float32_data_and_a_client_missing_classes():
    pytest.importorskip("sklearn")
    from pollinate.frameworks.sklearn import SklearnModel, SklearnRunner, build_estimator

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5)).astype(np.float32)  # the reported SequentialDataset64 bug
    y = (x[:, 0] > 0).astype(np.int64)  # classes 0 and 1 only, of 4
    for name in ("sgd", "logreg"):
        runner = SklearnRunner(SklearnModel(build_estimator(name, 5, 4, ()), 5, 4))
        client = FrameworkClient(runner, "sklearn", (x, y), None)
        res = client.train(runner.get_arrays(), {"epochs": 2})
        assert res.arrays[0].shape == (4, 5)
        assert res.metrics["accuracy"] > 0.8


def test_sklearn_regressors_fit_a_line():
    pytest.importorskip("sklearn")
    from pollinate.frameworks.sklearn import SklearnModel, SklearnRunner, build_estimator

    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + 0.3
    for name in ("sgd_regressor", "ridge"):
        runner = SklearnRunner(SklearnModel(build_estimator(name, 3, 2, ()), 3, 2))
        client = FrameworkClient(runner, "sklearn", (x, y), (x[:50], y[:50]))
        res = client.train(runner.get_arrays(), {"epochs": 5, "lr": 0.01})
        ev = client.evaluate(res.arrays, {})
        assert ev.metrics["r2"] > 0.95, name
        assert "accuracy" not in res.metrics


def test_sklearn_refuses_fedprox_and_scaffold(tmp_path):
    pytest.importorskip("sklearn")
    client, parts = client_for("sklearn", "sgd", tmp_path)
    with pytest.raises(ConfigError, match="sklearn adapter cannot run FedProx"):
        client.train(parts.initial_arrays, {"proximal_mu": 0.1})
    with pytest.raises(ConfigError, match="SCAFFOLD"):
        client.train(parts.initial_arrays, {"scaffold": True})


@pytest.mark.slow
def test_sklearn_run_sequential_equals_process(tmp_path):
    pytest.importorskip("sklearn")
    keys = ("model.framework=sklearn", "model.name=sgd", "train.lr=0.01")
    seq = run_experiment(small(tmp_path, "sequential", *keys), quiet=True)
    proc = run_experiment(small(tmp_path, "process", *keys), quiet=True)
    assert comparable(seq) == comparable(proc)
    for a, b in zip(seq.arrays, proc.arrays):
        np.testing.assert_array_equal(a, b)
    assert seq.history.rounds[-1]["centralized"]["accuracy"] > 0.8
    assert seq.history.rounds[-1]["train"]["metrics"]["num_steps"] > 0


# --- XGBoost ----------------------------------------------------------------------------------


def test_xgboost_client_adds_its_trees(tmp_path):
    pytest.importorskip("xgboost")
    client, parts = client_for("xgboost", "gbtree", tmp_path, local_rounds=2, max_depth=3)
    arrays = parts.initial_arrays
    assert arrays[0].dtype == np.uint8
    res = client.train(arrays, {"report_initial_loss": True, "local_evaluation": True})
    assert res.metrics["initial_loss"] == pytest.approx(np.log(10), rel=1e-4)
    assert res.metrics["loss"] < res.metrics["initial_loss"]
    assert res.metrics["num_steps"] == 2
    trees = json.loads(res.arrays[0].tobytes())["learner"]["gradient_booster"]["model"]["trees"]
    assert len(trees) == 2 * 10  # local_rounds x one tree per class
    merged = BoostedTreesBagging().merge(arrays, [res.arrays], [res.num_examples])
    loss, metrics = parts.evaluator(merged)
    assert metrics["accuracy"] > 0.6 and loss < np.log(10)
    with pytest.raises(ConfigError, match="xgboost adapter cannot run SCAFFOLD"):
        client.train(arrays, {"scaffold": True})


def test_xgboost_arrays_round_trip(tmp_path):
    """A client's trees, merged into Arrays and loaded by another worker, are the model the
    client trained: the same bytes back, the same loss and accuracy on its data."""
    pytest.importorskip("xgboost")
    from pollinate.frameworks.xgboost import XGBoostRunner

    client, parts = client_for("xgboost", "gbtree", tmp_path, local_rounds=2, max_depth=3)
    res = client.train(parts.initial_arrays, {})
    merged = BoostedTreesBagging().merge(parts.initial_arrays, [res.arrays], [res.num_examples])
    other = XGBoostRunner(parts.model_fn())
    other.set_arrays(merged)
    np.testing.assert_array_equal(other.get_arrays()[0], merged[0])
    x, y = other.prepare(client.train_data, "train")
    loss, metrics = other.evaluate(x, y, len(y))
    assert loss == pytest.approx(res.metrics["loss"], rel=1e-6)
    assert metrics["accuracy"] == res.metrics["accuracy"]


@pytest.mark.slow
def test_xgboost_run_sequential_equals_process(tmp_path):
    pytest.importorskip("xgboost")
    keys = ("model.framework=xgboost", "model.name=gbtree", "model.max_depth=3")
    keys += ("strategy.name=fedxgb_bagging",)
    seq = run_experiment(small(tmp_path, "sequential", *keys), quiet=True)
    proc = run_experiment(small(tmp_path, "process", *keys), quiet=True)
    assert comparable(seq) == comparable(proc)
    np.testing.assert_array_equal(seq.arrays[0], proc.arrays[0])
    accuracy = [r["centralized"]["accuracy"] for r in seq.history.rounds]
    assert accuracy[1] > accuracy[0] > 0.5


def test_xgboost_cyclic_trains_one_client_a_round(tmp_path):
    pytest.importorskip("xgboost")
    from pollinate.experiment import build_strategy
    from pollinate.simulation import simulate

    cfg = small(
        tmp_path,
        "sequential",
        "model.framework=xgboost",
        "model.name=gbtree",
        "strategy.name=fedxgb_cyclic",
    )
    cfg.run.rounds = 3
    data = build_data(cfg)
    parts = base.framework_parts(cfg, data)
    strategy = build_strategy(cfg, parts.evaluator)
    result = simulate(
        parts.client_fn,
        num_clients=3,
        strategy=strategy,
        initial_arrays=parts.initial_arrays,
        rounds=3,
        backend="sequential",
    )
    trained = [[c for c, e in r["clients"].items() if "train" in e] for r in result.history.rounds]
    assert trained == [["0"], ["1"], ["2"]]
    from pollinate.strategy.xgb import num_trees

    assert num_trees(result.arrays) == 3 * 10


def test_process_backend_pins_each_worker_to_its_gpu(monkeypatch):
    from pollinate.simulation.backends.process import ProcessBackend

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6")
    backend = ProcessBackend(workers=4, threads_per_worker=1, gpus_per_worker=0.5)
    pinned = [backend._env(i)["CUDA_VISIBLE_DEVICES"] for i in range(4)]
    assert pinned == ["5", "5", "6", "6"]
    assert "CUDA_VISIBLE_DEVICES" not in ProcessBackend(workers=2)._env(0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError, match="no GPU is visible"):
        backend._env(0)
