"""Tests for pollinate.report: run files, plots and the HTML report."""

from __future__ import annotations

import base64
import csv
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pollinate.errors import DataError, PollinateError
from pollinate.report import (
    plot_accuracy,
    plot_client_accuracy,
    plot_label_distribution,
    plot_loss,
    read_history,
    write_history,
    write_json_atomic,
    write_metrics_csv,
    write_report,
    write_run_outputs,
)
from pollinate.report.files import atomic_open

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_history(
    rounds: int = 3,
    num_clients: int = 4,
    centralized: bool = True,
    federated: bool = True,
    name: str = "test-run",
) -> dict[str, Any]:
    """A synthetic history following the history.json schema."""
    entries = []
    for r in range(1, rounds + 1):
        entry: dict[str, Any] = {"round": r, "wall_s": 1.5 * r}
        if centralized:
            entry["centralized"] = {"loss": 1.0 / r, "accuracy": 0.5 + 0.1 * r}
        if federated:
            entry["federated"] = {"loss": 1.2 / r, "accuracy": 0.45 + 0.1 * r, "clients": 2}
        entry["train"] = {
            "clients": num_clients,
            "failures": 0,
            "metrics": {"loss": 0.9 / r, "accuracy": 0.4 + 0.1 * r},
        }
        entry["clients"] = {
            cid: {
                "num_examples": 10 + cid,
                "train": {"loss": 0.5, "local_accuracy": 0.3 + 0.1 * r + 0.01 * cid},
                "evaluate": {"loss": 0.6, "accuracy": 0.35 + 0.1 * r},
            }
            for cid in range(num_clients)
        }
        entry["failures"] = []
        entries.append(entry)
    return {"config": {"run": {"name": name, "rounds": rounds}}, "rounds": entries}


def assert_png(path: Path | None) -> None:
    assert path is not None
    data = Path(path).read_bytes()
    assert len(data) > 0
    assert data.startswith(PNG_MAGIC)


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# -- files ---------------------------------------------------------------------------------


def test_history_round_trip(tmp_path: Path) -> None:
    history = make_history()
    history["rounds"][0]["centralized"]["accuracy"] = np.float32(0.5)
    history["rounds"][0]["train"]["clients"] = np.int64(4)

    path = write_history(tmp_path / "history.json", history)
    loaded = read_history(path)

    assert loaded["config"] == history["config"]
    assert len(loaded["rounds"]) == 3
    first = loaded["rounds"][0]
    assert (
        first["centralized"]["accuracy"] == 0.5 and type(first["centralized"]["accuracy"]) is float
    )
    assert first["train"]["clients"] == 4 and type(first["train"]["clients"]) is int
    assert set(first["clients"]) == {"0", "1", "2", "3"}  # int client ids become JSON keys
    assert first["clients"]["2"]["train"]["local_accuracy"] == pytest.approx(0.42)
    assert loaded["rounds"][2] == json.loads(json.dumps(history["rounds"][2]))
    assert read_history(tmp_path) == loaded  # a run folder works too


def test_history_write_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "history.json"
    write_history(path, make_history(rounds=1))
    write_history(path, make_history(rounds=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json"]
    assert len(read_history(path)["rounds"]) == 2


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "history.json"
    write_history(path, make_history(rounds=1))
    before = path.read_bytes()

    with pytest.raises(RuntimeError):
        with atomic_open(path) as handle:
            handle.write('{"half": ')
            raise RuntimeError("crash mid-write")
    with pytest.raises(TypeError, match="object"):
        write_history(path, {"config": {"x": object()}, "rounds": []})

    assert path.read_bytes() == before
    assert no_temp_files(tmp_path)


def test_non_finite_values_become_null(tmp_path: Path) -> None:
    history = make_history(rounds=2)
    history["rounds"][0]["centralized"]["loss"] = float("nan")
    history["rounds"][0]["federated"]["loss"] = float("inf")
    history["rounds"][1]["centralized"]["loss"] = np.float32("nan")
    history["rounds"][1]["federated"]["loss"] = -np.inf

    path = write_history(tmp_path / "history.json", history)
    text = path.read_text()

    def reject(constant: str) -> None:
        raise AssertionError(f"invalid JSON constant {constant} written")

    strict = json.loads(text, parse_constant=reject)
    assert strict["rounds"][0]["centralized"]["loss"] is None
    assert strict["rounds"][0]["federated"]["loss"] is None
    assert strict["rounds"][1]["centralized"]["loss"] is None
    assert strict["rounds"][1]["federated"]["loss"] is None
    assert strict["rounds"][0]["centralized"]["accuracy"] == pytest.approx(0.6)


def test_write_json_atomic_converts_numpy_and_paths(tmp_path: Path) -> None:
    obj = {"arr": np.arange(3), "path": tmp_path / "x", "flag": np.bool_(True), "t": (1, 2.5)}
    path = write_json_atomic(tmp_path / "sub" / "config.json", obj)
    assert json.loads(path.read_text()) == {
        "arr": [0, 1, 2],
        "path": str(tmp_path / "x"),
        "flag": True,
        "t": [1, 2.5],
    }
    assert no_temp_files(path.parent)


def test_read_history_missing_file_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "history.json"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        read_history(missing)


def test_read_history_corrupt_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "history.json"
    path.write_text('{"config": {}, "rounds": [')
    with pytest.raises(DataError, match=re.escape(str(path))) as info:
        read_history(path)
    assert isinstance(info.value, PollinateError)

    path.write_text('{"config": {}}')
    with pytest.raises(DataError, match="rounds"):
        read_history(path)

    path.write_text('{"rounds": [{"wall_s": 1.0}]}')
    with pytest.raises(DataError, match=r"rounds\[0\]"):
        read_history(path)


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def test_metrics_csv_columns_and_values(tmp_path: Path) -> None:
    history = make_history(rounds=2)
    history["rounds"][1]["train"]["metrics"]["accuracy"] = float("nan")
    columns, rows = read_csv(write_metrics_csv(tmp_path / "metrics.csv", history))

    assert columns[:8] == [
        "round",
        "wall_s",
        "centralized_loss",
        "centralized_accuracy",
        "federated_loss",
        "federated_accuracy",
        "train_clients",
        "train_failures",
    ]
    assert {"federated_clients", "train_loss", "train_accuracy"} <= set(columns[8:])
    assert len(rows) == 2
    assert rows[0]["round"] == "1" and rows[1]["round"] == "2"
    assert float(rows[0]["centralized_accuracy"]) == pytest.approx(0.6)
    assert float(rows[1]["federated_loss"]) == pytest.approx(0.6)
    assert rows[0]["train_clients"] == "4" and rows[0]["train_failures"] == "0"
    assert float(rows[0]["train_loss"]) == pytest.approx(0.9)
    assert rows[1]["train_accuracy"] == ""  # NaN is not a value
    assert not any(c.startswith("clients") or c.startswith("failures") for c in columns)


def test_metrics_csv_leaves_absent_metrics_empty(tmp_path: Path) -> None:
    history = make_history(rounds=2, federated=False)
    del history["rounds"][0]["centralized"]  # round 1: no centralized evaluation either
    columns, rows = read_csv(write_metrics_csv(tmp_path / "metrics.csv", history))

    assert "federated_accuracy" in columns  # the fixed columns are always there
    for row in rows:
        assert row["federated_loss"] == "" and row["federated_accuracy"] == ""
    assert rows[0]["centralized_accuracy"] == ""
    assert float(rows[1]["centralized_accuracy"]) == pytest.approx(0.7)


def test_metrics_csv_name_clash_keeps_both(tmp_path: Path) -> None:
    history = make_history(rounds=1)
    history["rounds"][0]["train"]["metrics"]["clients"] = 99  # clashes with train.clients
    history["rounds"][0]["privacy"] = {"epsilon": 1.25}
    columns, rows = read_csv(write_metrics_csv(tmp_path / "metrics.csv", history))
    assert rows[0]["train_clients"] == "4"
    assert rows[0]["train_metrics_clients"] == "99"
    assert float(rows[0]["privacy_epsilon"]) == 1.25


def test_metrics_csv_with_no_rounds(tmp_path: Path) -> None:
    columns, rows = read_csv(write_metrics_csv(tmp_path / "m.csv", {"config": {}, "rounds": []}))
    assert columns[0] == "round" and rows == []


# -- plots ---------------------------------------------------------------------------------


def test_global_plots_are_pngs(tmp_path: Path) -> None:
    history = make_history()
    accuracy = plot_accuracy(history, tmp_path)
    loss = plot_loss(history, tmp_path)
    assert accuracy == tmp_path / "accuracy.png" and loss == tmp_path / "loss.png"
    assert_png(accuracy)
    assert_png(loss)
    assert no_temp_files(tmp_path)


def test_global_plots_skip_absent_data(tmp_path: Path) -> None:
    nothing = make_history(centralized=False, federated=False)
    assert plot_accuracy(nothing, tmp_path) is None
    assert plot_loss(nothing, tmp_path) is None
    assert plot_accuracy({"config": {}, "rounds": []}, tmp_path) is None
    assert not (tmp_path / "accuracy.png").exists()
    assert not (tmp_path / "loss.png").exists()

    only_centralized = make_history(federated=False)
    assert_png(plot_accuracy(only_centralized, tmp_path))

    all_nan = make_history(federated=False)
    for entry in all_nan["rounds"]:
        entry["centralized"]["loss"] = None
    assert plot_loss(all_nan, tmp_path) is None


def test_client_accuracy_plot(tmp_path: Path) -> None:
    assert_png(plot_client_accuracy(make_history(num_clients=5), tmp_path))


def test_client_accuracy_falls_back_to_evaluate_accuracy(tmp_path: Path) -> None:
    history = make_history(centralized=False)  # global line from federated accuracy
    for entry in history["rounds"]:
        for record in entry["clients"].values():
            del record["train"]["local_accuracy"]
    assert_png(plot_client_accuracy(history, tmp_path))


def test_client_accuracy_band_for_many_clients(tmp_path: Path) -> None:
    history = make_history(num_clients=30, centralized=False, federated=False)
    assert_png(plot_client_accuracy(history, tmp_path))


def test_client_accuracy_skips_without_client_metrics(tmp_path: Path) -> None:
    history = make_history()
    for entry in history["rounds"]:
        entry["clients"] = {cid: {"num_examples": 3, "train": {"loss": 1.0}} for cid in range(3)}
    assert plot_client_accuracy(history, tmp_path) is None
    for entry in history["rounds"]:
        del entry["clients"]
    assert plot_client_accuracy(history, tmp_path) is None
    assert not (tmp_path / "client_accuracy.png").exists()


def test_label_distribution_bars(tmp_path: Path) -> None:
    counts = np.random.default_rng(0).integers(0, 50, size=(8, 10))
    names = [f"class {i}" for i in range(10)]
    out = plot_label_distribution(counts, tmp_path / "partitions.png", class_names=names)
    assert out == tmp_path / "partitions.png"
    assert_png(out)


def test_label_distribution_many_clients(tmp_path: Path) -> None:
    counts = np.random.default_rng(1).integers(0, 20, size=(300, 10))
    counts[5] = 0  # an empty client must not break the class-mix heatmap
    assert_png(plot_label_distribution(counts, tmp_path / "partitions.png"))


def test_label_distribution_rejects_bad_input(tmp_path: Path) -> None:
    out = tmp_path / "p.png"
    assert plot_label_distribution(np.zeros((0, 10), dtype=int), out) is None
    with pytest.raises(DataError, match="2-D"):
        plot_label_distribution(np.zeros(10, dtype=int), out)
    with pytest.raises(DataError, match="class_names"):
        plot_label_distribution(np.ones((3, 4), dtype=int), out, class_names=["a", "b"])
    with pytest.raises(DataError, match="non-negative"):
        plot_label_distribution(-np.ones((3, 4), dtype=int), out)
    assert not out.exists()


def test_import_does_not_load_matplotlib() -> None:
    code = "import sys, pollinate.report; assert 'matplotlib' not in sys.modules, 'loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- run outputs and HTML ------------------------------------------------------------------


def test_write_run_outputs(tmp_path: Path) -> None:
    counts = np.arange(20).reshape(4, 5)
    written = write_run_outputs(tmp_path, make_history(), label_counts=counts)
    assert {p.name for p in written} == {
        "history.json",
        "metrics.csv",
        "accuracy.png",
        "loss.png",
        "client_accuracy.png",
        "partitions.png",
    }
    assert all(p.is_file() for p in written)
    assert no_temp_files(tmp_path)


def test_write_run_outputs_removes_stale_plots(tmp_path: Path) -> None:
    write_run_outputs(tmp_path, make_history())
    assert (tmp_path / "loss.png").exists()
    written = write_run_outputs(tmp_path, make_history(centralized=False, federated=False))
    assert not (tmp_path / "loss.png").exists()
    assert not (tmp_path / "accuracy.png").exists()
    assert {p.name for p in written} == {"history.json", "metrics.csv", "client_accuracy.png"}


def embedded_images(page: str) -> list[bytes]:
    found = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    return [base64.b64decode(data) for data in found]


def test_report_is_self_contained(tmp_path: Path) -> None:
    write_run_outputs(tmp_path, make_history(), label_counts=np.ones((3, 4), dtype=int))
    page = write_report(tmp_path).read_text()

    images = embedded_images(page)
    assert len(images) == 4
    assert all(image.startswith(PNG_MAGIC) for image in images)
    assert (tmp_path / "accuracy.png").read_bytes() in images
    for external in ("<link", "<script", 'src="http', "url(", "@import"):
        assert external not in page
    assert "<title>test-run" in page
    assert "0.8000 (round 3)" in page  # final and best centralized accuracy
    assert "4.5 s" in page  # total wall time


def test_report_recreates_missing_plots(tmp_path: Path) -> None:
    write_history(tmp_path / "history.json", make_history())
    page = write_report(tmp_path).read_text()
    for name in ("accuracy.png", "loss.png", "client_accuracy.png"):
        assert_png(tmp_path / name)
    assert len(embedded_images(page)) == 3


def test_report_without_evaluation(tmp_path: Path) -> None:
    history = make_history(centralized=False, federated=False)
    for entry in history["rounds"]:
        del entry["clients"]
    write_history(tmp_path / "history.json", history)
    page = write_report(tmp_path).read_text()
    assert embedded_images(page) == []
    assert "not computed" in page
    assert not (tmp_path / "accuracy.png").exists()


def test_report_escapes_run_values(tmp_path: Path) -> None:
    evil = "<script>alert(1)</script>"
    history = make_history(name=evil)
    history["config"]["data"] = {"dataset": '"><img src=x onerror=alert(2)>'}
    history["config"][evil] = {"k": 1}
    history["rounds"][0]["failures"] = [{"client_id": 1, "task": "train", "reason": evil}]
    history["rounds"][0]["train"]["metrics"][evil] = 1.0
    write_history(tmp_path / "history.json", history)

    page = write_report(tmp_path).read_text()
    assert "<script" not in page
    assert "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("<img ") == len(embedded_images(page))  # only our embedded plots


def test_report_without_history_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"has no history\.json"):
        write_report(tmp_path)
    assert not (tmp_path / "report.html").exists()


def test_report_title_falls_back_to_folder_name(tmp_path: Path) -> None:
    run_dir = tmp_path / "my-run"
    history = make_history(rounds=1)
    history["config"] = {}
    write_history(run_dir / "history.json", history)
    page = write_report(run_dir).read_text()
    assert "<h1>my-run</h1>" in page
    assert "(no config recorded)" in page


def test_history_file_rewrites_incrementally_with_the_same_text(tmp_path):
    import json as _json

    from pollinate.report.files import HistoryFile, to_json_safe

    def expected(h):
        safe = to_json_safe(h, "h")
        return _json.dumps(safe, indent=2, allow_nan=False, ensure_ascii=False) + "\n"

    history = {"config": {"run": {"name": "é"}, "empty": {}}, "rounds": []}
    writer = HistoryFile(tmp_path / "history.json")
    for n in range(1, 5):
        history["rounds"].append(
            {"round": n, "clients": {"0": {"n": n}}, "loss": np.float32(0.5) / n, "x": []}
        )
    for n in (0, 1, 2, 4, 1, 3):  # growing, then a shorter history (a new run) and again
        view = {"config": history["config"], "rounds": history["rounds"][:n]}
        assert writer.write(view).read_text() == expected(view)
    assert HistoryFile(tmp_path / "h.json").write({"rounds": []}).read_text() == expected(
        {"rounds": []}
    )
