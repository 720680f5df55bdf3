"""Hugging Face data sets as sources, offline: built with Dataset.from_dict, saved to disk,
or read from local folders through datasets.load_dataset (the same call as for the Hub)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pollinate.data import Dataset, from_hf, load_dataset
from pollinate.errors import ConfigError, DataError, MissingDependencyError
from tests.waiting import patience

datasets = pytest.importorskip("datasets")
PIL = pytest.importorskip("PIL.Image")


@pytest.fixture(autouse=True)
def offline_cache(tmp_path, monkeypatch):
    """Hugging Face's cache in tmp_path, and no Hub: everything here is local."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def grey_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 6, 5), dtype=np.uint8)


def image_set(n: int = 40, seed: int = 0):
    """Grey 6x5 images, a ClassLabel of 4 classes, and a writer id (8 writers)."""
    pixels = grey_images(n, seed)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=["a", "b", "c", "d"]),
            "writer_id": datasets.Value("string"),
        }
    )
    return pixels, datasets.Dataset.from_dict(
        {
            "image": [PIL.fromarray(p) for p in pixels],
            "label": [i % 4 for i in range(n)],
            "writer_id": [f"w{i % 8}" for i in range(n)],
        },
        features=features,
    )


def test_image_column_becomes_channels_first_floats_as_the_other_data_sets() -> None:
    pixels, train = image_set(40)
    _, test = image_set(12, seed=1)
    ds = from_hf(datasets.DatasetDict({"train": train, "test": test}))
    digits = load_dataset("digits")
    assert ds.x_train.dtype == digits.x_train.dtype == np.float32
    assert ds.x_train.ndim == digits.x_train.ndim == 4 and ds.input_shape == (1, 6, 5)
    np.testing.assert_allclose(ds.x_train[:, 0], pixels / 255.0, rtol=1e-6)
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert ds.y_train.dtype == np.int64 and ds.y_train.tolist() == [i % 4 for i in range(40)]
    assert len(ds.y_test) == 12 and ds.num_classes == 4  # the data set's own test split
    assert ds.columns["writer_id"].tolist() == [f"w{i % 8}" for i in range(40)]


def test_colour_images_move_channels_first() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (10, 4, 3, 3), dtype=np.uint8)
    train = datasets.Dataset.from_dict(
        {"img": [PIL.fromarray(p) for p in rgb], "labels": list(range(10))},
        features=datasets.Features({"img": datasets.Image(), "labels": datasets.Value("int64")}),
    )
    ds = from_hf(train, test_fraction=0.5)
    assert ds.input_shape == (3, 4, 3)
    assert ds.num_classes == 10 and len(ds.y_train) + len(ds.y_test) == 10
    for x, y in zip(ds.x_train, ds.y_train):  # each row still matches its label
        np.testing.assert_allclose(x, rgb[y].transpose(2, 0, 1) / 255.0, rtol=1e-6)


def test_array_images_keep_their_uint8_scale_and_layout() -> None:
    """Nested lists of uint8 (what from_dict makes of a NumPy array) are images in [0, 1];
    float arrays are kept as they are; channels-last colour arrays move channels first."""
    grey = grey_images(10)
    ds = from_hf(datasets.Dataset.from_dict({"pixels": grey, "label": np.arange(10) % 2}))
    assert ds.input_shape == (1, 6, 5) and ds.x_train.max() <= 1.0
    rows = np.concatenate([ds.x_train, ds.x_test])[:, 0] * 255.0
    assert sorted(map(bytes, np.rint(rows).astype(np.uint8))) == sorted(map(bytes, grey))
    hwc = np.random.default_rng(0).random((10, 6, 5, 3)).astype(np.float32)
    ds = from_hf(datasets.Dataset.from_dict({"pixels": hwc, "label": np.arange(10) % 2}))
    assert ds.input_shape == (3, 6, 5)
    x = np.concatenate([ds.x_train, ds.x_test]).transpose(0, 2, 3, 1)
    assert sorted(map(bytes, x)) == sorted(map(bytes, hwc))  # unscaled floats


def test_a_single_split_is_held_out_stratified_and_the_same_every_time() -> None:
    _, train = image_set(40)
    a, b = from_hf(train), from_hf(train, test_fraction=0.3)
    assert len(a.y_test) == 8 and np.bincount(a.y_test).tolist() == [2, 2, 2, 2]  # 20% a class
    assert len(b.y_test) == 12
    np.testing.assert_array_equal(from_hf(train).x_test, a.x_test)
    # the kept column follows the training rows
    assert len(a.columns["writer_id"]) == len(a.y_train) == 32
    with pytest.raises(ConfigError, match="test_fraction must be between 0 and 1"):
        from_hf(train, test_fraction=0.0)


def test_tabular_columns_and_string_labels() -> None:
    table = datasets.Dataset.from_dict(
        {
            "age": [30, 41, 25, 60, 33, 52],
            "bmi": [21.5, 30.1, 19.0, 27.7, 24.2, 29.9],
            "vec": [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0], [9.0, 1.0], [2.0, 3.0]],
            "city": ["x", "y", "x", "z", "y", "x"],
            "outcome": ["sick", "well", "well", "sick", "ok", "well"],
        }
    )
    splits = datasets.DatasetDict({"train": table, "test": table.select([0, 4])})
    ds = from_hf(splits, label_column="outcome")
    assert ds.input_shape == (4,)  # age, bmi and the 2-vector; the string column is not a feature
    np.testing.assert_allclose(ds.x_train[1], [41, 30.1, 3.0, 4.0], rtol=1e-6)
    assert ds.y_train.tolist() == [1, 2, 2, 1, 0, 2]  # sorted: ok 0, sick 1, well 2
    assert ds.y_test.tolist() == [1, 0] and ds.num_classes == 3
    assert ds.columns["city"].tolist() == ["x", "y", "x", "z", "y", "x"]
    picked = from_hf(splits, label_column="outcome", feature_columns=["bmi"])
    assert picked.input_shape == (1,) and "age" in picked.columns
    assert from_hf(splits, label_column="outcome", keep=["age"]).input_shape == (3,)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "no 'label' or 'labels' column; columns are a, b, name"),
        ({"label_column": "lbl"}, "label_column = 'lbl' is not a column"),
        ({"label_column": "b", "feature_columns": ["c"]}, "feature_columns 'c' are not columns"),
        ({"label_column": "b", "feature_columns": ["name"]}, "holds no numbers"),
        ({"label_column": "b", "feature_columns": ["b"]}, "cannot also be a feature"),
    ],
)
def test_column_errors_name_the_columns(options, message: str) -> None:
    table = datasets.Dataset.from_dict({"a": [1.0, 2.0], "b": [0, 1], "name": ["p", "q"]})
    with pytest.raises(ConfigError, match=message):
        from_hf(table, **options)


def test_several_image_columns_ask_which() -> None:
    pixels = grey_images(4)
    two = datasets.Dataset.from_dict(
        {"left": [PIL.fromarray(p) for p in pixels], "right": [PIL.fromarray(p) for p in pixels]}
        | {"label": [0, 1, 0, 1]},
        features=datasets.Features(
            {"left": datasets.Image(), "right": datasets.Image(), "label": datasets.Value("int8")}
        ),
    )
    with pytest.raises(ConfigError, match=r"several image columns \(left, right\)"):
        from_hf(two)
    assert from_hf(two, feature_columns=["right"], test_fraction=0.5).input_shape == (1, 6, 5)


def test_images_of_different_sizes_are_refused_with_the_fix() -> None:
    images = [PIL.fromarray(np.zeros((4, 4), np.uint8)), PIL.fromarray(np.zeros((5, 5), np.uint8))]
    mixed = datasets.Dataset.from_dict(
        {"image": images, "label": [0, 1]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int8")}),
    )
    with pytest.raises(DataError, match="differ in size or channels"):
        from_hf(mixed, test_fraction=0.5)


def test_hf_disk_reads_save_to_disk(tmp_path) -> None:
    pixels, train = image_set(40)
    train.save_to_disk(str(tmp_path / "saved"))
    ds = load_dataset(f"hf-disk:{tmp_path / 'saved'}")
    assert isinstance(ds, Dataset) and ds.name == "saved"
    np.testing.assert_array_equal(ds.x_train, from_hf(train).x_train)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"hf-disk:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cannot read .*empty with datasets.load_from_disk"):
        load_dataset(f"hf-disk:{tmp_path / 'empty'}")


def test_hf_loads_a_local_image_folder_through_load_dataset(tmp_path) -> None:
    """``hf:PATH`` is ``datasets.load_dataset(PATH)``: split/class/*.png files."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 2)):
        for name in ("cat", "dog"):
            folder = tmp_path / "pets" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                value = 200 if name == "dog" else 10
                pixels = np.full((4, 4), value, np.uint8) + rng.integers(0, 5, (4, 4), np.uint8)
                PIL.fromarray(pixels).save(folder / f"{i}.png")
    ds = load_dataset(f"hf:{tmp_path / 'pets'}")
    assert ds.name == "pets" and ds.input_shape == (1, 4, 4) and ds.num_classes == 2
    assert len(ds.y_train) == 12 and len(ds.y_test) == 4
    # ClassLabel names sorted: cat 0, dog 1; dog pictures are bright
    assert np.all((ds.x_train.mean(axis=(1, 2, 3)) > 0.5) == (ds.y_train == 1))


def test_hf_loads_local_csv_files(tmp_path) -> None:
    folder = tmp_path / "clinic"
    folder.mkdir()
    (folder / "train.csv").write_text(
        "age,dose,site,label\n30,1.5,north,yes\n40,2.5,south,no\n50,0.5,north,yes\n"
    )
    (folder / "test.csv").write_text("age,dose,site,label\n35,1.0,east,no\n")
    ds = load_dataset(f"hf:{folder}")
    assert ds.input_shape == (2,) and ds.y_train.tolist() == [1, 0, 1] and ds.y_test.tolist() == [0]
    assert ds.columns["site"].tolist() == ["north", "south", "north"]


def test_hf_unknown_name_offline_says_what_to_do() -> None:
    with pytest.raises(DataError, match=r"load_dataset\('no-such-owner-h4/none'\) failed.*hf-disk"):
        load_dataset("hf:no-such-owner-h4/none")
    with pytest.raises(ConfigError, match="give a data set after hf:"):
        load_dataset("hf:")


def test_column_options_are_refused_for_fixed_array_sources() -> None:
    with pytest.raises(ConfigError, match="label_column and feature_columns choose the columns"):
        load_dataset("digits", label_column="y")


def test_without_datasets_installed_the_hint_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match=r"pollinate\[hf\]"):
        load_dataset("hf:mnist")


def test_npz_columns_named_train_are_kept(tmp_path) -> None:
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "w.npz",
        x_train=rng.integers(0, 256, (6, 4, 4), dtype=np.uint8),
        y_train=np.arange(6) % 2,
        x_test=rng.integers(0, 256, (2, 4, 4), dtype=np.uint8),
        y_test=np.array([0, 1]),
        writer_id_train=np.array([5, 5, 7, 7, 9, 9]),
        other=np.arange(3),  # not <column>_train: ignored
    )
    ds = load_dataset(f"npz:{tmp_path / 'w.npz'}")
    assert list(ds.columns) == ["writer_id"]
    assert ds.columns["writer_id"].tolist() == [5, 5, 7, 7, 9, 9]


def test_dataset_columns_must_match_the_training_rows() -> None:
    x = np.zeros((3, 2), np.float32)
    y = np.zeros(3, np.int64)
    with pytest.raises(DataError, match="column 'site' has shape \\(2,\\)"):
        Dataset("t", x, y, x, y, 1, columns={"site": np.array([1, 2])})


def test_a_saved_hf_data_set_runs_end_to_end(tmp_path, capsys) -> None:
    """``pollinate run`` on ``hf-disk:``: natural partition by writer, 2 rounds, sequential."""
    from pollinate.cli import main

    pixels, train = image_set(80)
    train.save_to_disk(str(tmp_path / "writers"))
    out = tmp_path / "run"
    config = tmp_path / "hf.toml"
    config.write_text(
        "[run]\nrounds = 2\n"
        f'output = "{out}"\n'
        "[data]\n"
        f'dataset = "hf-disk:{tmp_path / "writers"}"\n'
        'partition = "natural"\npartition_by = "writer_id"\nnum_clients = 8\n'
        "client_test_fraction = 0.2\n"
        '[model]\nname = "logreg"\n[train]\nepochs = 1\n'
        '[simulation]\nbackend = "sequential"\n'
    )
    assert main(["run", str(config), "--quiet"]) == 0, capsys.readouterr().err
    history = json.loads((out / "history.json").read_text())
    assert len(history["rounds"]) == 2
    last = history["rounds"][-1]
    assert last["train"]["clients"] == 8 and "accuracy" in last["centralized"]
    assert "accuracy" in last["federated"]
    assert history["config"]["data"]["partition_by"] == "writer_id"


def readme_hf_commands() -> tuple[str, list[list[str]]]:
    """The README's Hugging Face example: the script it saves, and its pollinate commands."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"```bash\n(pollinate run --set data.dataset=hf:.*?)```", text, re.S)
    assert block is not None
    script = re.search(r"python - <<'END'.*?\n(.*?)\nEND\n", block.group(1), re.S)
    assert script is not None
    joined = block.group(1)[script.end() :].replace("\\\n", " ")
    commands = [shlex.split(line)[1:] for line in joined.splitlines() if line.strip()]
    return script.group(1), commands


def test_readme_hf_example_works_as_written(tmp_path, monkeypatch, capsys) -> None:
    from pollinate.cli import main

    script, commands = readme_hf_commands()
    monkeypatch.chdir(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=patience(120)
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [c[0] for c in commands] == ["partition", "run"]
    assert main(commands[0]) == 0
    out = capsys.readouterr().out
    assert "hf-disk:digits-hf: 25 clients, partition natural" in out
    rows = [line.split() for line in out.splitlines() if line.split()[0].isdigit()]
    assert len(rows) == 25 and sum(int(r[1]) for r in rows) == 1438  # 80% of 1,797 digits
    quick = ["--set", "run.rounds=1", "--set", "simulation.backend=sequential", "--quiet"]
    assert main(commands[1] + quick) == 0
    history = json.loads((tmp_path / "runs" / "digits" / "history.json").read_text())
    assert history["config"]["data"]["partition"] == "pathological"
    assert history["config"]["data"]["classes_per_client"] == 3
    assert "accuracy" in history["rounds"][0]["centralized"]
