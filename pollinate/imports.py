"""Loading a user's own code named ``"package.module:attribute"`` in a config or a flag.

Used for ``model.name``, ``strategy.name``, ``data.partition``, and ``pollinate client
--app``. The folder the command runs from is importable, as it is for ``python -m``: a
``mymodels.py`` next to the config is ``"mymodels:make_model"``, from any install of
pollinate (the ``pollinate`` console script does not put the current folder on the path).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from pollinate.errors import ConfigError, dependency_error


def split_spec(spec: object, what: str) -> tuple[str, str]:
    """``"package.module:attr"`` as (module, attr); ``ConfigError`` naming ``what`` if it is
    not of that form."""
    module, sep, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or not module or not attr or ":" in attr:
        raise ConfigError(f"{what} {spec!r}: expected 'package.module:function'")
    return module, attr


def current_folder_importable() -> None:
    """Put the current folder on ``sys.path`` (at the end: it never hides an installed
    package) unless it is there already."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path and os.curdir not in sys.path:
        sys.path.append(cwd)


def load_object(spec: str, what: str, *, callable_: bool = True) -> Any:
    """Import ``spec`` = ``"package.module:attr"`` (``attr`` may be dotted) and return the
    attribute; the current folder is importable. ``what`` names the setting in errors
    (e.g. ``"model.name"``). A module that is not found, an attribute that is missing, or
    (with ``callable_``) one that cannot be called is a ``ConfigError`` saying where it was
    looked for; a missing optional dependency of the module (torch …) is a
    ``MissingDependencyError`` with its install line."""
    module_name, attr = split_spec(spec, what)
    current_folder_importable()
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = dependency_error(exc)
        if hint is not None:
            raise hint from exc
        missing = getattr(exc, "name", None)
        if (
            isinstance(exc, ModuleNotFoundError)
            and missing is not None
            and ((module_name + ".").startswith(missing + "."))
        ):
            path = module_name.replace(".", os.sep)
            raise ConfigError(
                f"{what} {spec!r}: cannot import {module_name!r}: it is neither in the current "
                f"folder ({os.getcwd()}) nor on the Python path; run from the folder that holds "
                f"{path}.py (or the package {path}{os.sep}), add that folder to PYTHONPATH, "
                "or install the package"
            ) from exc
        raise ConfigError(f"{what} {spec!r}: importing {module_name!r} failed: {exc}") from exc
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ConfigError(
                f"{what} {spec!r}: module {module_name!r} has no {attr!r} (the module was read "
                f"from {getattr(module, '__file__', None) or module_name})"
            )
        target = getattr(target, part)
    if callable_ and not callable(target):
        raise ConfigError(f"{what} {spec!r}: {attr!r} is not callable")
    return target
