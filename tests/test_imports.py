"""User code named "package.module:attr": the current folder is importable, errors say where."""

from __future__ import annotations

import sys

import pytest

from pollinate.errors import ConfigError, MissingDependencyError, dependency_error
from pollinate.imports import load_object


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A fresh current folder that is not on sys.path (as under the console script)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("h12_user")]:
        del sys.modules[name]


def test_a_module_in_the_current_folder_is_found(folder) -> None:
    (folder / "h12_user_mod.py").write_text(
        "class Factory:\n    @staticmethod\n    def make(n):\n        return [n] * n\n"
    )
    make = load_object("h12_user_mod:Factory.make", "model.name")
    assert make(3) == [3, 3, 3]
    assert str(folder) == sys.path[-1]  # appended: an installed package is never hidden


def test_a_package_in_the_current_folder_is_found(folder) -> None:
    (folder / "h12_user_pkg").mkdir()
    (folder / "h12_user_pkg" / "__init__.py").write_text("")
    (folder / "h12_user_pkg" / "split.py").write_text("def halves(n):\n    return n // 2\n")
    assert load_object("h12_user_pkg.split:halves", "data.partition")(9) == 4


def test_errors_name_the_setting_the_folder_and_the_fix(folder) -> None:
    (folder / "h12_user_bad.py").write_text("value = 3\nimport h12_user_nowhere\n")
    (folder / "h12_user_ok.py").write_text("value = 3\n")
    with pytest.raises(ConfigError, match="expected 'package.module:function'"):
        load_object("h12_user_ok.value", "model.name")
    with pytest.raises(ConfigError) as info:
        load_object("h12_user_absent:f", "model.name")
    message = str(info.value)
    assert "model.name 'h12_user_absent:f': cannot import 'h12_user_absent'" in message
    assert str(folder) in message and "run from the folder that holds" in message
    # a module that is found but fails to import says so, not "run from its folder"
    with pytest.raises(ConfigError, match="importing 'h12_user_bad' failed: No module named"):
        load_object("h12_user_bad:value", "--app")
    with pytest.raises(ConfigError, match="has no 'nope'"):
        load_object("h12_user_ok:nope", "--app")
    with pytest.raises(ConfigError, match="'value' is not callable"):
        load_object("h12_user_ok:value", "--app")
    assert load_object("h12_user_ok:value", "x", callable_=False) == 3


def test_a_user_module_needing_a_missing_extra_gets_its_install_line(folder, monkeypatch) -> None:
    (folder / "h12_user_torchy.py").write_text("import torch\n\ndef make():\n    return 1\n")
    monkeypatch.setitem(sys.modules, "torch", None)  # what an absent package looks like
    with pytest.raises(MissingDependencyError) as info:
        load_object("h12_user_torchy:make", "model.name")
    assert str(info.value).endswith(
        "pip install 'pollinate[torch]' (or, in a clone of the repository: "
        "pip install -e '.[torch]')"
    )


def test_dependency_error_knows_the_optional_packages_only() -> None:
    assert "pollinate[deploy]" in str(dependency_error(ModuleNotFoundError(name="grpc")))
    assert "pollinate[torch]" in str(dependency_error(ModuleNotFoundError(name="torch.nn")))
    assert "pip install -e '.[data]'" in str(dependency_error(ModuleNotFoundError(name="sklearn")))
    assert dependency_error(ModuleNotFoundError(name="torchvision")) is None
    assert dependency_error(ModuleNotFoundError(name="mymodels")) is None
    assert dependency_error(ImportError("cannot import name 'x'", name="torch")) is None
