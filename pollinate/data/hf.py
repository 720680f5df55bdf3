"""Hugging Face ``datasets`` as a source of labelled arrays.

- ``hf:NAME`` or ``hf:NAME:CONFIG``: ``datasets.load_dataset(NAME, CONFIG)`` — a data set on the
  Hub (downloaded once into Hugging Face's cache), or a local folder of images (one sub-folder
  per class, or per split then class), CSV, JSON or Parquet files;
- ``hf-disk:PATH``: ``datasets.load_from_disk(PATH)``, what ``save_to_disk`` wrote;
- a ``datasets.Dataset`` or ``DatasetDict`` object: :func:`from_hf`.

Splits: ``train`` and ``test`` when the data set has them (a single split is the training
data); otherwise a stratified ``test_fraction`` of the training rows, fixed seed 0, so every
run sees the same server test set.

Columns become arrays as the other data sets are:

- the label column (``label_column``; by default ``label``, else ``labels``) becomes int64 class
  indices: a ``ClassLabel`` keeps its indices, non-negative integers stay as they are, anything
  else (strings, floats, booleans) maps to the position of its value in sorted order;
- features (``feature_columns``; by default the one image column, else every numeric column
  but the label): an image column (``datasets.Image``, or arrays of 2 or 3 dimensions) becomes
  float32 ``(N, C, H, W)``, uint8 values divided by 255, channels-last input (``H, W, C`` with
  C <= 4) moved first; numeric columns (numbers or fixed-length vectors) become float32
  ``(N, F)``, unscaled;
- every other scalar column of the training split is kept in ``Dataset.columns`` (a writer id,
  say), for ``partition = "natural"``.

``datasets`` is imported only here, on first use (``pip install 'pollinate[hf]'``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pollinate.errors import ConfigError, DataError, missing_dependency

BATCH = 1024  # rows converted at a time: bounds the temporary memory of image decoding
LABEL_NAMES = ("label", "labels")


def load_hf(
    spec: str,
    *,
    label_column: str | None = None,
    feature_columns: Sequence[str] | None = None,
    test_fraction: float = 0.2,
    keep: Sequence[str] = (),
) -> Any:
    """Load ``hf:NAME[:CONFIG]`` or ``hf-disk:PATH`` (see the module docstring)."""
    datasets = _datasets()
    if spec.startswith("hf-disk:"):
        path = Path(spec[len("hf-disk:") :]).expanduser()
        if not path.exists():
            raise DataError(
                f"{path} does not exist; hf-disk:PATH reads a folder written by "
                "dataset.save_to_disk(PATH)"
            )
        try:
            obj = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise DataError(
                f"cannot read {path} with datasets.load_from_disk: {exc}; pass a folder written "
                "by save_to_disk (or use hf:PATH for a folder of images, CSV or Parquet files)"
            ) from exc
        name = path.name
    else:
        ref = spec[len("hf:") :]
        name, _, config = ref.partition(":")
        if not name:
            raise ConfigError(f"{spec!r}: give a data set after hf:, e.g. hf:mnist or hf:PATH")
        try:
            obj = datasets.load_dataset(name, config or None)
        except Exception as exc:  # the Hub, the network and the builders raise many kinds
            raise DataError(
                f"datasets.load_dataset({name!r}{f', {config!r}' if config else ''}) failed: "
                f"{type(exc).__name__}: {exc}. Check the name (and config); without network, "
                "use a copy saved with save_to_disk (hf-disk:PATH) or Hugging Face's cache "
                "(HF_DATASETS_OFFLINE=1)"
            ) from exc
        name = Path(name).name if Path(name).exists() else name
    return from_hf(
        obj,
        name=name,
        label_column=label_column,
        feature_columns=feature_columns,
        test_fraction=test_fraction,
        keep=keep,
    )


def from_hf(
    obj: Any,
    *,
    name: str | None = None,
    label_column: str | None = None,
    feature_columns: Sequence[str] | None = None,
    test_fraction: float = 0.2,
    keep: Sequence[str] = (),
) -> Any:
    """A :class:`pollinate.data.Dataset` from a ``datasets.Dataset`` or ``DatasetDict``.

    ``keep``: columns never taken as features (e.g. the ``partition_by`` column)."""
    from pollinate.data.datasets import Dataset, _stratified_test_mask

    train, test = _splits(obj)
    name = name or _info_name(train) or "hf"
    columns = list(train.column_names)
    label = _label_column(columns, label_column)
    features = _feature_columns(train, label, feature_columns, set(keep))
    if test is not None:
        missing = [c for c in (label, *features) if c not in test.column_names]
        if missing:
            raise DataError(f"the test split lacks the columns {', '.join(missing)}")
    x_train = _features(train, features)
    raw_train = _column(train, label)
    raw_test = _column(test, label) if test is not None else raw_train[:0]
    y_train, y_test, num_classes = _labels(raw_train, raw_test, train.features[label], label)
    others = {
        c: _column(train, c) for c in columns if c not in (label, *features) and _scalar(train, c)
    }
    if test is not None:
        x_test = _features(test, features)
    else:
        if not 0.0 < test_fraction < 1.0:
            raise ConfigError(
                f"test_fraction must be between 0 and 1 (exclusive) to hold out a test set from "
                f"{name!r}, which has no test split; got {test_fraction}"
            )
        mask = _stratified_test_mask(y_train, test_fraction, seed=0)
        x_test, y_test = x_train[mask], y_train[mask]
        x_train, y_train = x_train[~mask], y_train[~mask]
        others = {c: v[~mask] for c, v in others.items()}
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes, columns=others)


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as exc:
        raise missing_dependency("datasets", "hf") from exc
    return datasets


def _splits(obj: Any) -> tuple[Any, Any | None]:
    kind = type(obj).__name__
    if kind in ("IterableDataset", "IterableDatasetDict"):
        raise ConfigError(
            "streamed (iterable) data sets are not supported; load without streaming=True"
        )
    if kind == "Dataset" and hasattr(obj, "column_names"):
        return obj, None
    if hasattr(obj, "keys") and all(type(v).__name__ == "Dataset" for v in obj.values()):
        splits = dict(obj)
        if "train" in splits:
            return splits["train"], splits.get("test")
        if len(splits) == 1:
            return next(iter(splits.values())), None
        raise DataError(
            f"the data set has splits {', '.join(splits)} but no 'train' split; select one "
            "(e.g. dataset['validation']) and pass that"
        )
    raise ConfigError(
        f"expected a datasets.Dataset or DatasetDict, got {type(obj).__module__}.{kind}"
    )


def _info_name(ds: Any) -> str | None:
    info = getattr(ds, "info", None)
    return getattr(info, "dataset_name", None) or None


def _label_column(columns: list[str], given: str | None) -> str:
    if given:
        if given not in columns:
            raise ConfigError(
                f"label_column = {given!r} is not a column; columns are {', '.join(columns)}"
            )
        return given
    for candidate in LABEL_NAMES:
        if candidate in columns:
            return candidate
    raise ConfigError(
        f"no 'label' or 'labels' column; columns are {', '.join(columns)}: set "
        "data.label_column to the one holding the class"
    )


def _feature_columns(ds: Any, label: str, given: Sequence[str] | None, keep: set[str]) -> list[str]:
    columns = list(ds.column_names)
    if given:
        unknown = [c for c in given if c not in columns]
        if unknown:
            raise ConfigError(
                f"feature_columns {', '.join(map(repr, unknown))} are not columns; columns "
                f"are {', '.join(columns)}"
            )
        if label in given:
            raise ConfigError(f"the label column {label!r} cannot also be a feature column")
        images = [c for c in given if _is_image(ds, c)]
        if images and len(given) > 1:
            raise ConfigError(
                f"feature_columns mixes the image column {images[0]!r} with others; give one "
                "image column, or only numeric columns"
            )
        for c in given:
            if not images and not _numeric(ds, c):
                raise ConfigError(f"feature column {c!r} holds no numbers (or images)")
        return list(given)
    candidates = [c for c in columns if c != label and c not in keep]
    images = [c for c in candidates if _is_image(ds, c)]
    if len(images) == 1:
        return images
    if len(images) > 1:
        raise ConfigError(
            f"the data set has several image columns ({', '.join(images)}); set "
            f"data.feature_columns = [{images[0]!r}]"
        )
    numeric = [c for c in candidates if _numeric(ds, c)]
    if not numeric:
        raise ConfigError(
            f"no image or numeric feature column besides the label {label!r}; columns are "
            f"{', '.join(columns)}: set data.feature_columns"
        )
    return numeric


def _first(ds: Any, column: str) -> np.ndarray:
    """The column's first row as a NumPy batch of one (shape (1, ...))."""
    return np.asarray(ds.select_columns([column]).with_format("numpy")[:1][column])


def _is_image(ds: Any, column: str) -> bool:
    if type(ds.features[column]).__name__ == "Image":
        return True
    sample = _first(ds, column)
    return sample.dtype.kind in "biuf" and sample.ndim in (3, 4)


def _numeric(ds: Any, column: str) -> bool:
    sample = _first(ds, column)
    return sample.dtype.kind in "biuf" and sample.ndim in (1, 2)


def _scalar(ds: Any, column: str) -> bool:
    return _first(ds, column).ndim == 1


def _column(ds: Any, column: str) -> np.ndarray:
    """A whole column of scalars as one NumPy array."""
    values = np.asarray(ds.select_columns([column]).with_format("numpy")[:][column])
    if values.ndim != 1:
        raise DataError(f"column {column!r} must hold one value per row, got shape {values.shape}")
    return values


def _features(ds: Any, columns: list[str]) -> np.ndarray:
    """The feature columns as float32: images (N, C, H, W) or tabular (N, F)."""
    image = len(columns) == 1 and _is_image(ds, columns[0])
    hf_image = image and type(ds.features[columns[0]]).__name__ == "Image"
    # NumPy formatting widens nested lists of uint8 to int64: the feature keeps the dtype
    stored_uint8 = image and (hf_image or _leaf_dtype(ds.features[columns[0]]) == "uint8")
    view = ds.select_columns(columns).with_format("numpy")
    parts = []
    for start in range(0, len(ds), BATCH):
        batch = view[start : start + BATCH]
        if image:
            parts.append(_images(batch[columns[0]], columns[0], hf_image, stored_uint8))
        else:
            parts.append(_tabular([batch[c] for c in columns], columns))
    if not parts:
        return np.zeros((0, 0), dtype=np.float32)
    shapes = {p.shape[1:] for p in parts}
    if len(shapes) > 1:
        raise DataError(f"rows of {columns} have different shapes {sorted(shapes)}")
    return np.concatenate(parts)


def _leaf_dtype(feature: Any) -> str | None:
    """The dtype of the numbers inside a (nested) list or array feature."""
    while feature is not None:
        dtype = getattr(feature, "dtype", None)
        if isinstance(dtype, str):
            return dtype
        feature = getattr(feature, "feature", None)
    return None


def _images(values: Any, column: str, channels_last: bool, uint8: bool) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype == object:
        shapes = sorted({np.shape(v) for v in arr})[:3]
        raise DataError(
            f"the images of column {column!r} differ in size or channels ({shapes} …); make "
            f"them alike first, e.g. dataset.cast_column({column!r}, datasets.Image(mode='RGB')) "
            "and a map() that resizes"
        )
    if arr.ndim == 3:
        arr = arr[:, None]  # grey-scale (N, H, W) -> (N, 1, H, W)
    elif arr.ndim == 4 and (channels_last or (arr.shape[3] <= 4 < arr.shape[1])):
        arr = arr.transpose(0, 3, 1, 2)
    if uint8 or arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255.0)
    return arr.astype(np.float32)


def _tabular(values: list[Any], columns: list[str]) -> np.ndarray:
    blocks = []
    for column, value in zip(columns, values):
        arr = np.asarray(value)
        if arr.dtype.kind not in "biuf":
            raise DataError(f"feature column {column!r} holds {arr.dtype}, not numbers")
        blocks.append(arr.reshape(len(arr), -1).astype(np.float32))
    return np.concatenate(blocks, axis=1)


def _labels(
    raw_train: np.ndarray, raw_test: np.ndarray, feature: Any, column: str
) -> tuple[np.ndarray, np.ndarray, int]:
    """Labels as int64 class indices, the same mapping for train and test."""
    if type(feature).__name__ == "ClassLabel":
        num_classes = int(feature.num_classes)
        return raw_train.astype(np.int64), raw_test.astype(np.int64), num_classes
    both = np.concatenate([raw_train, raw_test])
    if both.dtype.kind in "iu" and (len(both) == 0 or both.min() >= 0):
        return raw_train.astype(np.int64), raw_test.astype(np.int64), int(both.max()) + 1
    if both.dtype == object:
        both = both.astype(str)
    try:
        values = np.unique(both)
    except TypeError as exc:
        raise DataError(f"label column {column!r} mixes values that cannot be sorted") from exc
    codes = np.searchsorted(values, both).astype(np.int64)
    return codes[: len(raw_train)], codes[len(raw_train) :], len(values)
