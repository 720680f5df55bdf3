"""Loading data sets: digits, npz, IDX files, POLLINATE_DATA lookup and verified downloads."""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pollinate.data import Dataset, IdxSource, download_idx, load_dataset, read_idx
from pollinate.data import datasets as datasets_module
from pollinate.data.datasets import parse_idx
from pollinate.errors import ConfigError, DataError

IDX_NAMES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
ANY_SHA = {filename: "0" * 64 for filename in IDX_NAMES.values()}
IDX_CODES = {np.dtype("u1"): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the user's POLLINATE_DATA or writes to the real cache."""
    monkeypatch.delenv("POLLINATE_DATA", raising=False)
    monkeypatch.setenv("POLLINATE_CACHE", str(tmp_path / "cache-root"))


def idx_bytes(array: np.ndarray) -> bytes:
    array = array.astype(array.dtype.newbyteorder(">"))
    code = IDX_CODES[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + array.tobytes()


def fake_arrays(seed: int, n_train: int = 30, n_test: int = 12) -> dict[str, np.ndarray]:
    """MNIST-shaped uint8 images and labels 0..9; ``seed`` makes each fake set distinct."""
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": (np.arange(n_train) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": (np.arange(n_test) % 10).astype(np.uint8),
    }


def save_npz(path: Path, arrays: dict[str, Any]) -> None:
    np.savez(path, **arrays)


def write_idx_set(folder: Path, arrays: dict[str, np.ndarray], gz: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for key, filename in IDX_NAMES.items():
        data = idx_bytes(arrays[key])
        if gz:
            (folder / filename).write_bytes(gzip.compress(data))
        else:
            (folder / filename.removesuffix(".gz")).write_bytes(data)


def assert_loaded(ds: Dataset, arrays: dict[str, np.ndarray]) -> None:
    np.testing.assert_allclose(ds.x_train[:, 0], arrays["x_train"] / 255.0, rtol=1e-6)
    np.testing.assert_allclose(ds.x_test[:, 0], arrays["x_test"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"])
    np.testing.assert_array_equal(ds.y_test, arrays["y_test"])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- digits -------------------------------------------------------------------------------


def test_digits_loads_a_deterministic_stratified_split() -> None:
    pytest.importorskip("sklearn")
    ds = load_dataset("digits")
    assert ds.name == "digits" and ds.num_classes == 10 and ds.input_shape == (1, 8, 8)
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() == 1.0
    train_counts = np.bincount(ds.y_train, minlength=10)
    test_counts = np.bincount(ds.y_test, minlength=10)
    fractions = test_counts / (train_counts + test_counts)
    assert np.all(np.abs(fractions - 0.2) < 0.01)  # stratified: every class ~20% test
    again = load_dataset(" Digits ")
    np.testing.assert_array_equal(again.x_train, ds.x_train)
    np.testing.assert_array_equal(again.y_test, ds.y_test)


def test_unknown_spec_names_the_allowed_values() -> None:
    with pytest.raises(ConfigError, match="digits, fashion-mnist, mnist, npz:PATH"):
        load_dataset("cifar-10")


# --- npz ----------------------------------------------------------------------------------


def test_npz_uint8_images_are_scaled_and_get_a_channel_axis(tmp_path: Path) -> None:
    arrays = fake_arrays(seed=1)
    save_npz(tmp_path / "mine.npz", arrays)
    ds = load_dataset(f"npz:{tmp_path / 'mine.npz'}")
    assert ds.name == "mine" and ds.input_shape == (1, 28, 28)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.num_classes == 10
    assert_loaded(ds, arrays)


def test_npz_float_features_are_kept_as_float32(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 5)) * 300.0  # not images: no scaling, no channel axis
    np.savez(
        tmp_path / "tab.npz",
        x_train=x,
        y_train=np.arange(20) % 4,
        x_test=x[:3],
        y_test=np.array([0.0, 1.0, 6.0]),  # integral float labels are accepted
    )
    ds = load_dataset(f"npz:{tmp_path / 'tab.npz'}")
    assert ds.x_train.dtype == np.float32 and ds.input_shape == (5,)
    np.testing.assert_allclose(ds.x_train, x, rtol=1e-6)
    assert ds.num_classes == 7 and ds.y_test.dtype == np.int64


def test_npz_missing_keys_are_named(tmp_path: Path) -> None:
    np.savez(tmp_path / "bad.npz", x_train=np.zeros((2, 3)), y_train=np.zeros(2, np.int64))
    with pytest.raises(DataError, match="lacks the arrays x_test, y_test"):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")


def test_npz_mismatched_lengths_are_refused(tmp_path: Path) -> None:
    arrays = fake_arrays(seed=2)
    arrays["y_train"] = arrays["y_train"][:-1]
    save_npz(tmp_path / "bad.npz", arrays)
    with pytest.raises(DataError, match="x_train has shape"):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "does not exist"),
        (b"this is not a zip file", "cannot read"),
    ],
)
def test_npz_missing_or_corrupt_file(tmp_path: Path, content: bytes | None, match: str) -> None:
    path = tmp_path / "broken.npz"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=match):
        load_dataset(f"npz:{path}")


def test_npz_non_integer_or_negative_labels_are_refused(tmp_path: Path) -> None:
    arrays = fake_arrays(seed=3)
    save_npz(tmp_path / "a.npz", {**arrays, "y_train": arrays["y_train"] + 0.5})
    with pytest.raises(DataError, match="labels must be integers"):
        load_dataset(f"npz:{tmp_path / 'a.npz'}")
    save_npz(tmp_path / "b.npz", {**arrays, "y_test": -arrays["y_test"].astype(np.int64)})
    with pytest.raises(DataError, match="negative labels"):
        load_dataset(f"npz:{tmp_path / 'b.npz'}")


def test_dataset_checks_labels_against_num_classes() -> None:
    x = np.zeros((3, 2), np.float32)
    with pytest.raises(DataError, match="outside"):
        Dataset("d", x, np.array([0, 1, 5]), x, np.array([0, 1, 1]), num_classes=3)
    with pytest.raises(DataError, match="one label per row"):
        Dataset("d", x, np.array([0, 1]), x, np.array([0, 1, 1]), num_classes=3)


# --- IDX parsing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
        np.arange(-12, 12, dtype=">i4").reshape(2, 3, 4),
        np.linspace(-1, 1, 24, dtype=">f4").reshape(2, 3, 4),
    ],
    ids=["uint8", "int32", "float32"],
)
def test_idx_round_trip(tmp_path: Path, array: np.ndarray) -> None:
    path = tmp_path / "a-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(array)))
    out = read_idx(path)
    assert out.shape == (2, 3, 4) and out.dtype.isnative
    np.testing.assert_array_equal(out, array)


def test_idx_reads_uncompressed_files(tmp_path: Path) -> None:
    labels = np.array([3, 1, 4], dtype=np.uint8)
    (tmp_path / "labels").write_bytes(idx_bytes(labels))
    np.testing.assert_array_equal(read_idx(tmp_path / "labels"), labels)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda raw: b"\x01" + raw[1:], "bad magic number"),
        (lambda raw: raw[:2] + b"\x07" + raw[3:], "bad magic number"),  # unknown type code
        (lambda raw: raw[:3] + b"\x00" + raw[4:], "declares 0 dimensions"),
        (lambda raw: raw[:10], "header is truncated"),
        (lambda raw: raw[:-1], "truncated or corrupt"),
        (lambda raw: raw + b"\x00", "truncated or corrupt"),
        (lambda raw: raw[:4] + np.array([2, 9, 4], ">u4").tobytes() + raw[16:], "header says"),
        (lambda raw: b"", "bad magic number"),
    ],
)
def test_corrupt_idx_is_refused(mutate: Callable[[bytes], bytes], match: str) -> None:
    raw = idx_bytes(np.zeros((2, 3, 4), dtype=np.uint8))
    with pytest.raises(DataError, match=match):
        parse_idx(mutate(raw))


def test_truncated_gzip_is_refused(tmp_path: Path) -> None:
    data = gzip.compress(idx_bytes(np.arange(1000, dtype=np.uint8)))
    path = tmp_path / "cut-idx1-ubyte.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="fetch it again"):
        read_idx(path)
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read"):
        read_idx(path)


# --- fashion-mnist / mnist lookup ---------------------------------------------------------


def test_pollinate_data_idx_files_are_loaded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    arrays = fake_arrays(seed=4)
    write_idx_set(tmp_path / "shared", arrays)
    monkeypatch.setenv("POLLINATE_DATA", str(tmp_path / "shared"))
    ds = load_dataset("fashion-mnist")
    assert ds.name == "fashion-mnist" and ds.num_classes == 10
    assert ds.input_shape == (1, 28, 28)
    assert_loaded(ds, arrays)


def test_pollinate_data_takes_precedence_over_data_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    shared, local = fake_arrays(seed=5), fake_arrays(seed=6)
    write_idx_set(tmp_path / "shared", shared)
    write_idx_set(tmp_path / "local", local)
    assert_loaded(load_dataset("mnist", data_dir=tmp_path / "local"), local)
    monkeypatch.setenv("POLLINATE_DATA", str(tmp_path / "shared"))
    assert_loaded(load_dataset("mnist", data_dir=tmp_path / "local"), shared)


def test_keras_npz_comes_before_idx_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from_npz, from_idx = fake_arrays(seed=7), fake_arrays(seed=8)
    write_idx_set(tmp_path / "shared", from_idx)
    save_npz(tmp_path / "shared" / "fashion-mnist.npz", from_npz)
    monkeypatch.setenv("POLLINATE_DATA", str(tmp_path / "shared"))
    assert_loaded(load_dataset("fashion-mnist"), from_npz)
    assert_loaded(load_dataset("mnist", data_dir=tmp_path / "empty"), from_idx)


def test_a_subfolder_per_data_set_is_searched_first(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    mnist, fashion = fake_arrays(seed=9), fake_arrays(seed=10)
    write_idx_set(tmp_path / "shared", mnist)
    write_idx_set(tmp_path / "shared" / "fashion-mnist", fashion, gz=False)
    monkeypatch.setenv("POLLINATE_DATA", str(tmp_path / "shared"))
    assert_loaded(load_dataset("fashion-mnist"), fashion)
    assert_loaded(load_dataset("mnist"), mnist)


def test_another_data_sets_idx_files_are_recognised(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    write_idx_set(tmp_path / "shared", fake_arrays(seed=11))
    labels_sha = sha256(tmp_path / "shared" / IDX_NAMES["y_train"])
    # pretend these fake files are the official MNIST ones (same name, known checksum)
    mnist = IdxSource("file:///nowhere/", {IDX_NAMES["y_train"]: labels_sha})
    monkeypatch.setitem(datasets_module.SOURCES, "mnist", mnist)
    monkeypatch.setenv("POLLINATE_DATA", str(tmp_path / "shared"))
    with pytest.raises(DataError, match="are mnist, not fashion-mnist"):
        load_dataset("fashion-mnist")


def test_partial_idx_set_names_the_missing_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    write_idx_set(tmp_path / "shared", fake_arrays(seed=12))
    (tmp_path / "shared" / IDX_NAMES["x_test"]).unlink()
    monkeypatch.setenv("POLLINATE_DATA", str(tmp_path / "shared"))
    with pytest.raises(DataError, match="add t10k-images-idx3-ubyte.gz"):
        load_dataset("fashion-mnist")


def test_idx_files_that_do_not_match_are_refused(tmp_path: Path) -> None:
    arrays = fake_arrays(seed=13)
    arrays["y_test"] = arrays["y_test"][:-1]
    write_idx_set(tmp_path / "local", arrays)
    with pytest.raises(DataError, match="do not match"):
        load_dataset("mnist", data_dir=tmp_path / "local")


def test_cache_folder_comes_from_pollinate_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    arrays = fake_arrays(seed=14)
    monkeypatch.setenv("POLLINATE_CACHE", str(tmp_path / "c"))
    write_idx_set(tmp_path / "c" / "mnist", arrays)
    assert_loaded(load_dataset("mnist"), arrays)


# --- downloads ----------------------------------------------------------------------------


def make_mirror(folder: Path, arrays: dict[str, np.ndarray]) -> IdxSource:
    """A local 'web site' serving the four IDX files, and their true checksums."""
    write_idx_set(folder, arrays)
    return IdxSource(folder.as_uri() + "/", {fn: sha256(folder / fn) for fn in IDX_NAMES.values()})


def test_download_fetches_verifies_and_caches(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    arrays = fake_arrays(seed=15)
    mirror = make_mirror(tmp_path / "mirror", arrays)
    monkeypatch.setitem(datasets_module.SOURCES, "mnist", mirror)
    cache = tmp_path / "cache"
    assert_loaded(load_dataset("mnist", data_dir=cache), arrays)
    assert sorted(p.name for p in cache.iterdir()) == sorted(IDX_NAMES.values())  # no temp files
    for path in (tmp_path / "mirror").iterdir():
        path.unlink()  # the second load must come from the cache, not the mirror
    assert_loaded(load_dataset("mnist", data_dir=cache), arrays)


def test_download_fetches_only_missing_files(tmp_path: Path) -> None:
    arrays = fake_arrays(seed=16)
    mirror = make_mirror(tmp_path / "mirror", arrays)
    cache = tmp_path / "cache"
    cache.mkdir()
    for filename in list(IDX_NAMES.values())[:2]:
        (tmp_path / "mirror" / filename).rename(cache / filename)
    download_idx(mirror, cache)
    assert_loaded(load_dataset("mnist", data_dir=cache), arrays)


def test_download_with_wrong_sha256_leaves_nothing_behind(tmp_path: Path) -> None:
    mirror = make_mirror(tmp_path / "mirror", fake_arrays(seed=17))
    bad = IdxSource(mirror.base_url, ANY_SHA)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz has SHA-256 [0-9a-f]{64}"):
        download_idx(bad, cache)
    assert list(cache.iterdir()) == []


def test_failed_download_names_the_url_and_pollinate_data(tmp_path: Path) -> None:
    gone = IdxSource((tmp_path / "no-such-site").as_uri() + "/", ANY_SHA)
    with pytest.raises(DataError) as info:
        download_idx(gone, tmp_path / "cache")
    message = str(info.value)
    assert (tmp_path / "no-such-site").as_uri() + "/train-images-idx3-ubyte.gz" in message
    assert "POLLINATE_DATA" in message
    assert list((tmp_path / "cache").iterdir()) == []


def test_load_without_files_or_network_explains_where_it_looked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gone = IdxSource((tmp_path / "offline").as_uri() + "/", ANY_SHA)
    monkeypatch.setitem(datasets_module.SOURCES, "fashion-mnist", gone)
    monkeypatch.setenv("POLLINATE_DATA", str(tmp_path / "shared"))
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist")
    message = str(info.value)
    assert str(tmp_path / "shared" / "fashion-mnist.npz") in message
    assert str(tmp_path / "cache-root" / "fashion-mnist") in message
    assert "could not download" in message and "POLLINATE_DATA" in message


def test_known_checksums_are_well_formed() -> None:
    for source in datasets_module.SOURCES.values():
        assert source.base_url.startswith("https://")
        assert set(source.sha256) == set(IDX_NAMES.values())
        assert all(len(h) == 64 and int(h, 16) >= 0 for h in source.sha256.values())
