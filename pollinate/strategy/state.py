"""A strategy's state, packed for a checkpoint file: NumPy arrays apart, the rest as JSON.

``pack`` walks the nested dict of ``Strategy.state()``: every NumPy array (alone or in a
list) becomes an entry of its own, named by its path, and the tree keeps a reference
``{"__array__": name}`` in its place; ``unpack`` puts them back. No pickle anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from pollinate.errors import PollinateError

PREFIX = "state__"


def pack(state: Mapping[str, Any]) -> tuple[Any, dict[str, np.ndarray]]:
    """``(tree, arrays)``: the JSON-safe tree and the arrays it refers to."""
    arrays: dict[str, np.ndarray] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, np.ndarray):
            name = f"{PREFIX}{len(arrays):04d}"
            arrays[name] = value
            return {"__array__": name}
        if isinstance(value, Mapping):
            return {str(k): walk(v, f"{path}/{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(value)]
        if isinstance(value, np.generic):
            return value.item()
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"strategy state at {path or '/'} is a {type(value).__name__}")

    return walk(dict(state), ""), arrays


def unpack(tree: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    """The state ``pack`` took apart."""
    if isinstance(tree, dict):
        if set(tree) == {"__array__"}:
            name = tree["__array__"]
            if name not in arrays:
                raise PollinateError(f"the saved strategy state refers to a missing array {name}")
            return np.array(arrays[name])
        return {k: unpack(v, arrays) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unpack(v, arrays) for v in tree]
    return tree
