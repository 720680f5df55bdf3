"""Data sets: load one by name into NumPy arrays.

``load_dataset(spec)`` understands:

- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, no download), split 80/20
  per class with a fixed seed, so every run sees the same split.
- ``fashion-mnist`` and ``mnist``: 28x28 grey-scale images, 60,000 train and 10,000 test.
  Searched, in this order:

  1. the folder named by ``POLLINATE_DATA``: ``<name>.npz``, ``<name>/<name>.npz``,
     ``<name>/`` with the four official IDX files, then the IDX files in the folder itself;
  2. the cache folder (``data_dir`` if given, else ``$POLLINATE_CACHE/<name>``, by default
     ``~/.cache/pollinate/<name>``): ``<name>.npz``, then the four IDX files;
  3. otherwise the four IDX files are downloaded into the cache folder, each checked against
     its published SHA-256.

  ``<name>.npz`` uses Keras' layout (arrays ``x_train``, ``y_train``, ``x_test``, ``y_test``);
  IDX files may be gzipped (``*.gz``, as distributed) or not.
- ``npz:PATH``: your own arrays in that layout (uint8 images become float32 in [0, 1]). Any
  other 1-D array named ``<column>_train`` with one value per training example (e.g.
  ``writer_id_train``) is kept as ``Dataset.columns["<column>"]``, for ``partition = "natural"``.
- ``hf:NAME[:CONFIG]``, ``hf-disk:PATH`` or a ``datasets.Dataset`` / ``DatasetDict`` object:
  Hugging Face data sets (:mod:`pollinate.data.hf`; ``label_column``, ``feature_columns`` and
  ``test_fraction`` apply to these only).

Images come out float32, channels first ``(N, C, H, W)``; labels int64.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import math
import os
import tempfile
import urllib.request
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pollinate.errors import ConfigError, DataError, missing_dependency

logger = logging.getLogger(__name__)

DATA_ENV = "POLLINATE_DATA"
CACHE_ENV = "POLLINATE_CACHE"
ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")
IDX_FILES = (  # (file name, array key), in the order the official sites list them
    ("train-images-idx3-ubyte.gz", "x_train"),
    ("train-labels-idx1-ubyte.gz", "y_train"),
    ("t10k-images-idx3-ubyte.gz", "x_test"),
    ("t10k-labels-idx1-ubyte.gz", "y_test"),
)


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled data set: float32 inputs, int64 labels in [0, num_classes), train and test.

    ``columns``: other per-example values of the training split by column name (a writer or
    a hospital id, one value per training example), for ``partition = "natural"``.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    columns: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for column, values in self.columns.items():
            if np.ndim(values) != 1 or len(values) != len(self.y_train):
                raise DataError(
                    f"data set {self.name!r}: column {column!r} has shape {np.shape(values)}; "
                    f"expected one value per training example ({len(self.y_train)})"
                )
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if y.ndim != 1 or len(x) != len(y):
                raise DataError(
                    f"data set {self.name!r}: x_{split} has {len(x)} rows but y_{split} has "
                    f"shape {y.shape}; expected one label per row"
                )
            if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
                raise DataError(
                    f"data set {self.name!r}: y_{split} holds labels outside "
                    f"[0, {self.num_classes}); labels must be 0 .. num_classes-1"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(
                f"data set {self.name!r}: train inputs have shape {self.x_train.shape[1:]} but "
                f"test inputs {self.x_test.shape[1:]}"
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input, e.g. ``(1, 28, 28)``."""
        return tuple(self.x_train.shape[1:])


@dataclass(frozen=True)
class IdxSource:
    """Where to download a data set's four IDX files, and the SHA-256 each must have."""

    base_url: str
    sha256: Mapping[str, str]


# SHA-256 of the official .gz files (Fashion-MNIST: as published by Zalando Research, whose
# README gives the MD5s 8d4fb7e6…, 25c81989…, bef4ecab…, bb300cfd…; MNIST: the files LeCun et al.
# distribute, MD5 f68b3c2d…, d53e105e…, 9fb629c4…, ec29112d…, mirrored by PyTorch).
SOURCES: dict[str, IdxSource] = {
    "fashion-mnist": IdxSource(
        "https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        {
            "train-images-idx3-ubyte.gz": (
                "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"
            ),
            "train-labels-idx1-ubyte.gz": (
                "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"
            ),
            "t10k-images-idx3-ubyte.gz": (
                "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"
            ),
            "t10k-labels-idx1-ubyte.gz": (
                "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"
            ),
        },
    ),
    "mnist": IdxSource(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        {
            "train-images-idx3-ubyte.gz": (
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"
            ),
            "train-labels-idx1-ubyte.gz": (
                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"
            ),
            "t10k-images-idx3-ubyte.gz": (
                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"
            ),
            "t10k-labels-idx1-ubyte.gz": (
                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"
            ),
        },
    ),
}
DATASET_NAMES = ("digits", *SOURCES, "npz:PATH", "hf:NAME[:CONFIG]", "hf-disk:PATH")


def load_dataset(
    spec: Any,
    data_dir: str | Path | None = None,
    *,
    label_column: str | None = None,
    feature_columns: Sequence[str] | None = None,
    test_fraction: float = 0.2,
    keep: Sequence[str] = (),
) -> Dataset:
    """Load the data set named by ``spec`` (see the module docstring for where files are found).

    ``spec`` may also be a Hugging Face ``datasets.Dataset`` or ``DatasetDict``. The keyword
    arguments apply to Hugging Face sources only (:func:`pollinate.data.hf.from_hf`)."""
    hf_options: dict[str, Any] = {
        "label_column": label_column,
        "feature_columns": feature_columns,
        "test_fraction": test_fraction,
        "keep": keep,
    }
    if not isinstance(spec, str):
        from pollinate.data.hf import from_hf

        return from_hf(spec, **hf_options)  # type: ignore[no-any-return]
    name = spec.strip()
    if name.startswith(("hf:", "hf-disk:")):
        from pollinate.data.hf import load_hf

        return load_hf(name, **hf_options)  # type: ignore[no-any-return]
    if label_column or feature_columns:
        raise ConfigError(
            f"label_column and feature_columns choose the columns of a Hugging Face data set "
            f"(hf:, hf-disk:); {spec!r} has fixed x and y arrays: drop them"
        )
    if name.startswith("npz:"):
        path = Path(name[4:]).expanduser()
        return _dataset_from_arrays(path.stem, _read_npz(path), source=str(path))
    name = name.lower()
    if name == "digits":
        return _load_digits()
    if name in SOURCES:
        return _load_idx_dataset(name, data_dir)
    raise ConfigError(
        f"unknown data set {spec!r}; use one of: {', '.join(DATASET_NAMES)} "
        "(npz:PATH reads x_train, y_train, x_test, y_test from your own .npz file; hf:NAME "
        "loads a Hugging Face data set)"
    )


def cache_dir(name: str) -> Path:
    """The folder ``name``'s files are downloaded to: ``$POLLINATE_CACHE/<name>``."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pollinate"
    return Path(root).expanduser() / name


# --- digits -------------------------------------------------------------------------------


def _load_digits() -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise missing_dependency("scikit-learn", "data") from exc
    bunch = load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    test = _stratified_test_mask(y, test_fraction=0.2, seed=0)
    return Dataset("digits", x[~test], y[~test], x[test], y[test], num_classes=10)


def _stratified_test_mask(y: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Mark round(n_c * test_fraction) random examples of every class c as test examples."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        mask[rng.permutation(members)[: round(len(members) * test_fraction)]] = True
    return mask


# --- npz ----------------------------------------------------------------------------------


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(f"npz file {path} does not exist; pass npz:PATH with an existing file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [key for key in ARRAY_KEYS if key not in npz.files]
            if missing:
                raise DataError(
                    f"{path} lacks the arrays {', '.join(missing)}; it has "
                    f"{', '.join(npz.files) or 'none'} (expected {', '.join(ARRAY_KEYS)})"
                )
            return {key: npz[key] for key in npz.files}
    except DataError:
        raise
    except (OSError, ValueError, zlib.error, EOFError) as exc:
        raise DataError(f"cannot read {path} as an .npz file: {exc}") from exc


def _dataset_from_arrays(
    name: str, arrays: dict[str, np.ndarray], source: str, num_classes: int | None = None
) -> Dataset:
    """Check and convert raw arrays: inputs to float32 (uint8 / 255, channel axis), labels int64."""
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim < 1 or y.ndim != 1 or len(x) != len(y):
            raise DataError(
                f"{source}: x_{split} has shape {x.shape} and y_{split} {y.shape}; expected "
                f"the same number of rows in both and 1-D labels"
            )
    if len(arrays["y_train"]) == 0:
        raise DataError(f"{source}: x_train is empty; a data set needs training examples")
    xs = [_to_inputs(arrays[key], key, source) for key in ("x_train", "x_test")]
    ys = [_to_labels(arrays[key], key, source) for key in ("y_train", "y_test")]
    if num_classes is None:
        num_classes = int(max(y.max(initial=-1) for y in ys)) + 1
    columns = {
        key.removesuffix("_train"): values
        for key, values in arrays.items()
        if key.endswith("_train")
        and key not in ARRAY_KEYS
        and values.ndim == 1
        and len(values) == len(ys[0])
    }
    return Dataset(name, xs[0], ys[0], xs[1], ys[1], num_classes=num_classes, columns=columns)


def _to_inputs(x: np.ndarray, key: str, source: str) -> np.ndarray:
    if x.dtype == np.uint8:
        images = x.astype(np.float32) / np.float32(255.0)
        return images[:, None] if images.ndim == 3 else images
    if x.dtype.kind not in "biuf":
        raise DataError(f"{source}: {key} has dtype {x.dtype}; expected numbers")
    return x.astype(np.float32, copy=False)


def _to_labels(y: np.ndarray, key: str, source: str) -> np.ndarray:
    if y.dtype.kind == "f" and np.all(np.mod(y, 1) == 0):
        y = y.astype(np.int64)
    if y.dtype.kind not in "iu":
        raise DataError(f"{source}: {key} has dtype {y.dtype}; labels must be integers")
    if len(y) and y.min() < 0:
        raise DataError(f"{source}: {key} holds negative labels; use labels 0 .. classes-1")
    return y.astype(np.int64, copy=False)


# --- IDX ----------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzipped if its name ends in .gz), checking its header and length."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path}: {exc}; delete it and fetch it again") from exc
    return parse_idx(raw, source=str(path))


def parse_idx(raw: bytes, source: str = "IDX data") -> np.ndarray:
    """Decode IDX bytes: 2 zero bytes, a type code, ndim, ndim big-endian uint32 sizes, data."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{source} is not an IDX file (bad magic number {raw[:4].hex()!r})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{source}: IDX header is truncated or declares {ndim} dimensions")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{source}: header says shape {shape} ({expected} bytes of data) but the file holds "
            f"{len(raw) - header}; the file is truncated or corrupt, fetch it again"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _idx_path(folder: Path, filename: str) -> Path | None:
    """The gzipped or the uncompressed copy of ``filename`` in ``folder``, if either exists."""
    for path in (folder / filename, folder / filename.removesuffix(".gz")):
        if path.is_file():
            return path
    return None


def _read_idx_folder(name: str, folder: Path) -> Dataset:
    arrays = {key: read_idx(_idx_path(folder, fn) or folder / fn) for fn, key in IDX_FILES}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y) or x.dtype != np.uint8:
            raise DataError(
                f"{folder}: {split} images {x.shape} {x.dtype} and labels {y.shape} do not "
                "match; expected uint8 images (N, H, W) and N labels"
            )
    return _dataset_from_arrays(name, arrays, source=str(folder), num_classes=10)


# --- fashion-mnist / mnist: lookup and download -------------------------------------------


def _load_idx_dataset(name: str, data_dir: str | Path | None) -> Dataset:
    searched: list[str] = []
    shared = os.environ.get(DATA_ENV)
    if shared:
        root = Path(shared).expanduser()
        for npz in (root / f"{name}.npz", root / name / f"{name}.npz"):
            searched.append(str(npz))
            if npz.is_file():
                return _dataset_from_arrays(name, _read_npz(npz), str(npz), num_classes=10)
        for folder in (root / name, root):
            searched.append(f"{folder}/ (IDX files)")
            present = [fn for fn, _ in IDX_FILES if _idx_path(folder, fn)]
            if len(present) == len(IDX_FILES):
                if folder == root:
                    _check_not_other_dataset(name, folder)
                return _read_idx_folder(name, folder)
            if present:
                missing = [fn for fn, _ in IDX_FILES if fn not in present]
                raise DataError(f"{folder} holds only some IDX files; add {', '.join(missing)}")
    cache = Path(data_dir).expanduser() if data_dir is not None else cache_dir(name)
    npz = cache / f"{name}.npz"
    if npz.is_file():
        return _dataset_from_arrays(name, _read_npz(npz), str(npz), num_classes=10)
    searched += [str(npz), f"{cache}/ (IDX files)"]
    try:
        download_idx(SOURCES[name], cache)
    except DataError as exc:
        raise DataError(
            f"{name} not found locally (searched {'; '.join(searched)}). {exc}"
        ) from exc
    return _read_idx_folder(name, cache)


def _check_not_other_dataset(name: str, folder: Path) -> None:
    """Refuse another data set's IDX files (MNIST and Fashion-MNIST share file names)."""
    filename = "train-labels-idx1-ubyte.gz"
    path = folder / filename
    if not path.is_file():
        return
    digest = _sha256(path)
    for other, source in SOURCES.items():
        if other != name and source.sha256.get(filename) == digest:
            raise DataError(
                f"the IDX files in {folder} are {other}, not {name}; put each data set's IDX "
                f"files in its own folder: ${DATA_ENV}/{name}/ and ${DATA_ENV}/{other}/"
            )


def download_idx(source: IdxSource, folder: str | Path) -> None:
    """Download the IDX files missing from ``folder``, verify each SHA-256, write atomically."""
    folder = Path(folder)
    for filename, _ in IDX_FILES:
        if _idx_path(folder, filename) is None:
            url = source.base_url.rstrip("/") + "/" + filename
            _download(url, folder / filename, source.sha256[filename])


def _download(url: str, dest: Path, sha256: str) -> None:
    """Stream ``url`` into a temporary file beside ``dest``; rename it once its hash matches."""
    logger.info("downloading %s to %s", url, dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.NamedTemporaryFile(
            dir=dest.parent, prefix=f".{dest.name}.", suffix=".part", delete=False
        )
    except OSError as exc:
        raise DataError(f"cannot write to {dest.parent}: {exc}; pass another data_dir") from exc
    digest = hashlib.sha256()
    try:
        with tmp, urllib.request.urlopen(url, timeout=60) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                tmp.write(chunk)
        if digest.hexdigest() != sha256:
            raise DataError(
                f"{url} has SHA-256 {digest.hexdigest()}, expected {sha256}: the download is "
                f"corrupt or the mirror changed; try again, or place the official file in "
                f"the folder named by ${DATA_ENV}"
            )
        os.replace(tmp.name, dest)
    except (OSError, http.client.HTTPException) as exc:
        raise DataError(
            f"could not download {url}: {exc}. Without network access, fetch the four IDX files "
            f"({', '.join(fn for fn, _ in IDX_FILES)}) elsewhere and place them in a folder "
            f"named by the environment variable {DATA_ENV}"
        ) from exc
    finally:
        Path(tmp.name).unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
