"""The model zoo: built-in architectures, user models by "module:function", checks."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap

import pytest

from pollinate.errors import ConfigError, MissingDependencyError
from pollinate.models import MODEL_NAMES, build_model, check_model, model_fn

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402


def param_counts(model: nn.Module) -> list[int]:
    """Parameter count per layer that has parameters, in order."""
    counts = []
    for layer in model.modules():
        own = sum(p.numel() for p in layer.parameters(recurse=False))
        if own:
            counts.append(own)
    return counts


def test_model_names():
    assert MODEL_NAMES == ("logreg", "mlp", "cnn")


def test_cnn_is_the_seed_cnn_for_28x28():
    model = build_model("cnn", (1, 28, 28), 10)
    assert param_counts(model) == [320, 18496, 1600 * 128 + 128, 1290]
    assert [type(m).__name__ for m in model] == [
        "Conv2d",
        "ReLU",
        "MaxPool2d",
        "Conv2d",
        "ReLU",
        "MaxPool2d",
        "Flatten",
        "Linear",
        "ReLU",
        "Linear",
    ]
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_cnn_handles_color_and_the_smallest_images():
    model = build_model("cnn", (3, 32, 32), 5)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 5)
    assert param_counts(model)[0] == 3 * 9 * 32 + 32
    smallest = build_model("cnn", (1, 10, 11), 3)
    assert smallest(torch.zeros(4, 1, 10, 11)).shape == (4, 3)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 9, 28), (3, 28, 9)])
def test_cnn_rejects_small_images_and_suggests_mlp(shape):
    with pytest.raises(ConfigError, match=r"at least 10x10 pixels.*'mlp' or 'logreg'"):
        build_model("cnn", shape, 10)


def test_cnn_needs_channels_height_width():
    with pytest.raises(ConfigError, match=r"\(channels, height, width\)"):
        build_model("cnn", (28, 28), 10)


def test_logreg_is_one_linear_layer():
    model = build_model("logreg", (1, 8, 8), 10)
    assert param_counts(model) == [64 * 10 + 10]
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    flat = build_model("logreg", (30,), 2)
    assert flat(torch.zeros(3, 30)).shape == (3, 2)


def test_mlp_has_one_relu_layer_per_hidden_size():
    model = build_model("mlp", (1, 8, 8), 10, hidden=(32, 16))
    assert param_counts(model) == [64 * 32 + 32, 32 * 16 + 16, 16 * 10 + 10]
    assert sum(isinstance(m, nn.ReLU) for m in model) == 2
    assert model(torch.zeros(5, 1, 8, 8)).shape == (5, 10)
    assert param_counts(build_model("mlp", (4,), 3)) == [4 * 64 + 64, 64 * 3 + 3]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("resnet", (1, 28, 28), 10), "unknown model 'resnet'; use one of logreg, mlp, cnn"),
        ((":f", (1, 28, 28), 10), "unknown model"),
        (("mlp", (1, 0, 28), 10), "input_shape must be a list of positive integers"),
        (("mlp", (), 10), "at least one dimension"),
        (("mlp", (1, 8, 8), 1), "num_classes must be an integer >= 2"),
        (("mlp", (1, 8, 8), 10.0), "num_classes must be an integer >= 2"),
    ],
)
def test_bad_arguments_are_config_errors(args, match):
    with pytest.raises(ConfigError, match=match):
        build_model(*args)
    with pytest.raises(ConfigError, match=match):
        model_fn(*args)  # checked eagerly, before any worker builds it


def test_bad_hidden_sizes():
    with pytest.raises(ConfigError, match="hidden must be a list of positive integers"):
        model_fn("mlp", (1, 8, 8), 10, hidden=(64, -1))


def test_model_fn_is_picklable_and_builds_the_same_architecture():
    fn = model_fn("mlp", [1, 8, 8], 10, hidden=[16])
    clone = pickle.loads(pickle.dumps(fn))
    a, b = fn(), clone()
    assert a is not b
    assert [tuple(p.shape) for p in a.parameters()] == [tuple(p.shape) for p in b.parameters()]
    assert param_counts(a) == [64 * 16 + 16, 16 * 10 + 10]


def test_check_model_normalises_arguments():
    assert check_model("cnn", [1, 28, 28], 10, [8]) == ((1, 28, 28), (8,))


# --- user models ------------------------------------------------------------------------------


USER_MODULE = """
from torch import nn

def with_shape(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[-1] * input_shape[-2], num_classes))

def with_kwargs(**kwargs):
    seen.update(kwargs)
    return nn.Linear(2, kwargs["num_classes"])

def no_args():
    return nn.Linear(3, 4)

def not_a_model(num_classes):
    return "model"

class Net(nn.Module):
    def __init__(self, num_classes=2):
        super().__init__()
        self.out = nn.Linear(5, num_classes)

seen = {}
not_callable = 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    package = tmp_path / "my_models"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "zoo.py").write_text(USER_MODULE)
    (package / "broken.py").write_text("import a_dependency_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_models.zoo"
    for name in [m for m in sys.modules if m.startswith("my_models")]:
        del sys.modules[name]


def test_user_model_gets_shape_and_classes(user_module):
    model = build_model(f"{user_module}:with_shape", (1, 6, 7), 4)
    assert model(torch.zeros(2, 1, 6, 7)).shape == (2, 4)


def test_user_model_with_kwargs_gets_everything(user_module):
    build_model(f"{user_module}:with_kwargs", (1, 6, 7), 4, hidden=(9,))
    seen = sys.modules[user_module].seen
    assert seen == {"input_shape": (1, 6, 7), "num_classes": 4, "hidden": (9,)}


def test_user_model_without_arguments_and_classes(user_module):
    assert isinstance(build_model(f"{user_module}:no_args", (1, 6, 7), 4), nn.Linear)
    net = build_model(f"{user_module}:Net", (5,), 7)
    assert net.out.out_features == 7


def test_user_model_through_a_pickled_model_fn(user_module):
    fn = pickle.loads(pickle.dumps(model_fn(f"{user_module}:no_args", (3,), 4)))
    assert isinstance(fn(), nn.Linear)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("my_models.missing:f", "cannot import 'my_models.missing'.*PYTHONPATH"),
        ("no_such_package_xyz:f", "cannot import 'no_such_package_xyz'"),
        ("my_models.broken:f", "importing 'my_models.broken' failed.*a_dependency_that_is_not"),
        ("my_models.zoo:missing", "module 'my_models.zoo' has no 'missing'"),
        ("my_models.zoo:not_callable", "'not_callable' is not callable"),
        ("my_models.zoo:not_a_model", r"must return a torch.nn.Module, got str"),
    ],
)
def test_user_model_errors(user_module, name, match):
    with pytest.raises(ConfigError, match=match):
        build_model(name, (1, 8, 8), 10)


# --- lazy torch -------------------------------------------------------------------------------


def test_models_and_frameworks_import_without_torch():
    code = textwrap.dedent(
        """
        import sys
        import pollinate.frameworks, pollinate.models
        pollinate.models.model_fn("cnn", (1, 28, 28), 10)
        assert "torch" not in sys.modules, "torch was imported"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_building_without_torch_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # what an absent package looks like
    with pytest.raises(MissingDependencyError, match=r"pip install 'pollinate\[torch\]'"):
        build_model("mlp", (1, 8, 8), 10)
