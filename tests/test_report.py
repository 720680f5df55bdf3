"""Tests for pollinate.report: run files, plots and the HTML report."""

from __future__ import annotations

import base64
import csv
import html
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
    plot_accuracy_bytes,
    plot_accuracy_time,
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
from pollinate.report.client_plot import (
    MAX_HIGHLIGHTED,
    client_accuracy_figure,
    client_accuracy_panels,
)
from pollinate.report.cost_plots import (
    accuracy_bytes_figure,
    accuracy_time_figure,
    cumulative_cost,
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


def client_history(
    sampled: dict[int, dict[int, float]],
    local: dict[int, dict[int, float]] | None = None,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A history whose round r has ``sampled[r]`` = {client: global-model accuracy on its
    test data} and ``local[r]`` = {client: its trained model's accuracy}."""
    local = local or {}
    entries = []
    for r in sorted(set(sampled) | set(local)):
        clients: dict[str, Any] = {}
        for cid, value in local.get(r, {}).items():
            clients.setdefault(str(cid), {"num_examples": 5})["train"] = {"local_accuracy": value}
        for cid, value in sampled.get(r, {}).items():
            clients.setdefault(str(cid), {"num_examples": 5})["evaluate"] = {"accuracy": value}
        entries.append({"round": r, "centralized": {"accuracy": 0.5}, "clients": clients})
    return {"config": config or {}, "rounds": entries}


def lines_by_label(ax: Any) -> dict[str, Any]:
    return {line.get_label(): line for line in ax.get_lines()}


def test_client_accuracy_band_is_over_each_rounds_clients(tmp_path: Path) -> None:
    history = client_history(
        {1: {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4, 4: 0.5}, 2: {5: 0.9, 6: 0.7}},
        local={1: {0: 0.6}},
    )
    evaluate, train = client_accuracy_panels(history)

    assert (evaluate.task, evaluate.key) == ("evaluate", "accuracy")
    assert (train.task, train.key) == ("train", "local_accuracy")
    assert evaluate.rounds.tolist() == [1, 2] and evaluate.count.tolist() == [5, 2]
    # percentiles with linear interpolation: 0.1 + 0.4 × 0.1 and 0.1 + 0.4 × 0.9
    assert evaluate.median.tolist() == pytest.approx([0.3, 0.8])
    assert evaluate.low.tolist() == pytest.approx([0.14, 0.72])
    assert evaluate.high.tolist() == pytest.approx([0.46, 0.88])
    assert train.rounds.tolist() == [1] and train.median.tolist() == pytest.approx([0.6])
    assert_png(plot_client_accuracy(history, tmp_path))


def test_client_accuracy_with_one_client(tmp_path: Path) -> None:
    history = client_history({1: {7: 0.25}, 2: {7: 0.5}})
    (panel,) = client_accuracy_panels(history)  # no local accuracy: one panel
    assert list(panel.clients) == ["7"]
    assert panel.median.tolist() == panel.low.tolist() == panel.high.tolist() == [0.25, 0.5]

    fig = client_accuracy_figure(history)
    assert fig is not None
    (ax,) = fig.axes
    lines = lines_by_label(ax)
    assert lines["client 7"].get_ydata().tolist() == [0.25, 0.5]
    assert "1 clients" not in ax.get_title() and "1 client per round" in ax.get_title()
    assert_png(plot_client_accuracy(history, tmp_path))


def test_client_accuracy_of_a_single_round_is_framed_and_visible() -> None:
    fig = client_accuracy_figure(client_history({1: {0: 0.2, 1: 0.4, 2: 0.9}}))
    assert fig is not None
    (ax,) = fig.axes
    assert ax.get_xlim() == (0.5, 1.5) and ax.get_xticks().tolist() == [1]
    assert len(ax.collections) == 2  # the band: an empty area and its one-round bar
    central = lines_by_label(ax)["global model on the server's test set (centralized)"]
    assert central.get_marker() == "D"  # one point: a marker, not an invisible line


def test_client_accuracy_with_two_clients(tmp_path: Path) -> None:
    history = client_history(
        {1: {0: 0.2, 1: 0.6}, 2: {0: 0.4, 1: 0.8}}, local={1: {0: 0.5, 1: 0.7}}
    )
    fig = client_accuracy_figure(history)
    assert fig is not None
    evaluate_ax, train_ax = fig.axes
    assert "federated evaluation" in evaluate_ax.get_title()
    assert "local evaluation" in train_ax.get_title()
    assert "own test data" in evaluate_ax.get_ylabel()
    for ax in (evaluate_ax, train_ax):
        assert {"client 0", "client 1"} <= set(lines_by_label(ax))
    assert lines_by_label(evaluate_ax)["client 1"].get_ydata().tolist() == [0.6, 0.8]
    assert lines_by_label(train_ax)["client 1"].get_ydata().tolist() == [0.7]
    # one colour per client in both panels
    for label in ("client 0", "client 1"):
        colors = {str(lines_by_label(ax)[label].get_color()) for ax in fig.axes}
        assert len(colors) == 1
    assert_png(plot_client_accuracy(history, tmp_path))


def test_client_accuracy_no_line_across_rounds_a_client_missed(tmp_path: Path) -> None:
    # client 3 takes part in rounds 1 and 3, not in round 2 (where others do)
    history = client_history(
        {1: {1: 0.1, 2: 0.2, 3: 0.3}, 2: {1: 0.4, 2: 0.5}, 3: {1: 0.6, 3: 0.7}},
    )
    (panel,) = client_accuracy_panels(history)
    values = panel.clients["3"]
    assert panel.rounds.tolist() == [1, 2, 3]
    assert values[0] == 0.3 and np.isnan(values[1]) and values[2] == 0.7

    fig = client_accuracy_figure(history)
    assert fig is not None
    line = lines_by_label(fig.axes[0])["client 3"]
    x, y = np.asarray(line.get_xdata()), np.asarray(line.get_ydata(), dtype=float)
    drawn = [(x[i], x[i + 1]) for i in range(len(x) - 1) if np.isfinite(y[i : i + 2]).all()]
    assert drawn == []  # matplotlib draws no segment next to a NaN: two lone markers
    assert line.get_marker() == "o"
    both = lines_by_label(fig.axes[0])["client 1"]
    assert np.isfinite(np.asarray(both.get_ydata(), dtype=float)).all()  # every round: a line


def test_client_accuracy_with_200_clients_stays_readable(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    sampled = {
        r: {int(c): float(rng.uniform()) for c in rng.choice(200, size=80, replace=False)}
        for r in range(1, 6)
    }
    local = {r: {c: min(1.0, v + 0.1) for c, v in values.items()} for r, values in sampled.items()}
    history = client_history(sampled, local)
    fig = client_accuracy_figure(history)
    assert fig is not None
    for ax in fig.axes:
        clients = [label for label in lines_by_label(ax) if label.startswith("client ")]
        assert 1 <= len(clients) <= MAX_HIGHLIGHTED
        assert len(ax.get_lines()) <= MAX_HIGHLIGHTED + 2  # + median and centralized
        assert "80 clients per round" in ax.get_title()
    legend_entries = sum(len(legend.get_texts()) for legend in fig.legends)
    assert legend_entries <= MAX_HIGHLIGHTED + 3
    (panel, _) = client_accuracy_panels(history)
    third = sorted(sampled[3].values())
    assert panel.median[2] == pytest.approx(np.median(third))
    assert_png(plot_client_accuracy(history, tmp_path))


def test_client_accuracy_highlights_are_spread_and_deterministic() -> None:
    # client c scores c / 10 every round: lowest to highest mean is the id order
    rounds = {r: {c: c / 10 for c in range(10)} for r in range(1, 5)}
    rounds[4][42] = 1.0  # seen once: too rare to be drawn one by one
    history = client_history(rounds)
    (panel,) = client_accuracy_panels(history)
    # evenly spread over the 10 candidates: indices round(linspace(0, 9, 5)) = 0, 2, 4, 7, 9
    assert list(panel.clients) == ["0", "2", "4", "7", "9"]
    assert list(client_accuracy_panels(history)[0].clients) == list(panel.clients)
    assert list(client_accuracy_panels(history, max_highlighted=2)[0].clients) == ["0", "9"]


def test_client_accuracy_pools_many_server_steps() -> None:
    steps = {s: {s % 7: 0.5, s % 7 + 7: 0.7} for s in range(1, 451)}
    history = client_history(steps, config={"strategy": {"name": "fedbuff"}})
    (panel,) = client_accuracy_panels(history)
    assert panel.window == 3 and len(panel.band_x) == 150  # ceil(450 / 200) steps a point
    assert panel.band_x[0] == 2.0 and panel.median[0] == pytest.approx(0.6)
    assert len(panel.rounds) == 450  # the clients drawn one by one keep every step
    fig = client_accuracy_figure(history)
    assert fig is not None
    assert fig.axes[0].get_xlabel() == "server step"
    assert "windows of 3 server steps" in fig.axes[0].get_title()


def test_client_accuracy_skips_without_client_metrics(tmp_path: Path) -> None:
    history = make_history()
    for entry in history["rounds"]:
        entry["clients"] = {cid: {"num_examples": 3, "train": {"loss": 1.0}} for cid in range(3)}
    assert plot_client_accuracy(history, tmp_path) is None
    for entry in history["rounds"]:
        del entry["clients"]
    assert plot_client_accuracy(history, tmp_path) is None
    assert not (tmp_path / "client_accuracy.png").exists()


def with_environment(history: dict[str, Any], seconds: list[float | None]) -> dict[str, Any]:
    """Give round i a virtual-clock record of seconds[i] s, 1000·(i+1) bytes down and
    100·(i+1) up; None: that round has no environment record."""
    for i, (entry, s) in enumerate(zip(history["rounds"], seconds)):
        if s is not None:
            entry["environment"] = {
                "simulated_time_s": s,
                "bytes_down": 1000 * (i + 1),
                "bytes_up": 100 * (i + 1),
                "clients": {"0": {"train": {"status": "ok", "bytes_up": 1}}},
            }
    return history


def test_cumulative_cost_sums_the_rounds_that_carry_it() -> None:
    history = with_environment(make_history(rounds=4), [10.0, None, 20.0, 30.0])
    time = cumulative_cost(history, "simulated_time_s")
    assert time.rounds.tolist() == [1, 3, 4] and time.cost.tolist() == [10.0, 30.0, 60.0]
    both = cumulative_cost(history, "bytes_down", "bytes_up")
    assert both.cost.tolist() == [1100.0, 1100.0 + 3300.0, 1100.0 + 3300.0 + 4400.0]
    assert cumulative_cost(make_history(), "simulated_time_s").rounds.size == 0


def test_accuracy_against_time_and_bytes(tmp_path: Path) -> None:
    history = with_environment(make_history(rounds=3), [10.0, 20.0, 30.0])
    fig = accuracy_time_figure(history)
    assert fig is not None
    (ax,) = fig.axes
    central = lines_by_label(ax)["centralized (server's test set)"]
    # 10, 30, 60 s cumulative, shown in minutes (the largest unit not above 60 s)
    assert np.asarray(central.get_xdata()).tolist() == pytest.approx([1 / 6, 0.5, 1.0])
    assert np.asarray(central.get_ydata()).tolist() == pytest.approx([0.6, 0.7, 0.8])
    assert "simulated time" in ax.get_xlabel() and "(min)" in ax.get_xlabel()

    fig = accuracy_bytes_figure(history)
    assert fig is not None
    up_ax, both_ax = fig.axes
    up = lines_by_label(up_ax)["centralized (server's test set)"]
    both = lines_by_label(both_ax)["centralized (server's test set)"]
    assert np.asarray(up.get_xdata()).tolist() == pytest.approx([100, 300, 600])  # B
    assert np.asarray(both.get_xdata()).tolist() == pytest.approx([1.1, 3.3, 6.6])  # kB
    assert "(B)" in up_ax.get_xlabel() and "(kB)" in both_ax.get_xlabel()

    assert_png(plot_accuracy_time(history, tmp_path))
    assert_png(plot_accuracy_bytes(history, tmp_path))


def test_time_and_bytes_plots_only_with_environment_data(tmp_path: Path) -> None:
    assert plot_accuracy_time(make_history(), tmp_path) is None
    assert plot_accuracy_bytes(make_history(), tmp_path) is None
    no_accuracy = with_environment(make_history(centralized=False, federated=False), [1.0] * 3)
    assert plot_accuracy_time(no_accuracy, tmp_path) is None
    assert not list(tmp_path.glob("*.png"))

    written = write_run_outputs(tmp_path, with_environment(make_history(), [5.0, 5.0, 5.0]))
    assert {"accuracy_time.png", "accuracy_bytes.png"} <= {p.name for p in written}
    written = write_run_outputs(tmp_path, make_history())  # the same folder, a run without
    assert not {"accuracy_time.png", "accuracy_bytes.png"} & {p.name for p in written}
    assert not (tmp_path / "accuracy_time.png").exists()
    assert not (tmp_path / "accuracy_bytes.png").exists()


def test_server_steps_plot_like_rounds(tmp_path: Path) -> None:
    history = with_environment(make_history(rounds=3), [1.0, 1.0, 1.0])
    history["config"]["strategy"] = {"name": "fedbuff"}
    fig = accuracy_time_figure(history)
    assert fig is not None
    assert fig.axes[0].get_legend().get_title().get_text() == "one point per server step"
    written = {p.name for p in write_run_outputs(tmp_path, history)}
    assert {"accuracy.png", "client_accuracy.png", "accuracy_time.png"} <= written
    page = write_report(tmp_path).read_text()
    assert '<th class="key">server steps</th><td class="key">3</td>' in page


def test_metrics_csv_leaves_out_per_client_environment(tmp_path: Path) -> None:
    history = with_environment(make_history(rounds=2), [3.0, 4.0])
    columns, rows = read_csv(write_metrics_csv(tmp_path / "metrics.csv", history))
    assert rows[1]["environment_simulated_time_s"] == "4.0"
    assert rows[1]["environment_bytes_up"] == "200"
    assert not [c for c in columns if "clients_0" in c]


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


def without_plots(history: dict[str, Any]) -> dict[str, Any]:
    """``history`` without what the plots draw (the page is written without rendering any)."""
    for entry in history["rounds"]:
        for key in ("centralized", "federated", "clients"):
            entry.pop(key, None)
    return history


def test_report_summary_names_the_experiment(tmp_path: Path) -> None:
    history = without_plots(make_history(rounds=2))
    history["config"].update(
        {
            "data": {
                "dataset": "fashion-mnist",
                "partition": "dirichlet",
                "num_clients": 20,
                "alpha": 0.3,
                "shards_per_client": 2,
                "client_test_fraction": 0.2,
            },
            "model": {"name": "mlp", "hidden": [64, 32]},
            "strategy": {
                "name": "fedadam",
                "fraction_train": 0.5,
                "fraction_evaluate": 0.25,
                "selection": "uniform",
                "max_norm": 0.0,
                "server_lr": 0.01,
                "proximal_mu": None,
            },
            "privacy": {"mode": "central", "noise_multiplier": 1.1, "clip": 0.5, "delta": 1e-5},
        }
    )
    history["rounds"][-1]["privacy"] = {"epsilon": 2.345}
    write_history(tmp_path / "history.json", history)
    page = write_report(tmp_path).read_text()
    summary = page[page.index("<h2>Summary</h2>") : page.index("<h2>Plots</h2>")]

    def row(key: str) -> str:
        found = re.search(rf'<th class="key">{key}</th><td class="key">([^<]*)</td>', summary)
        assert found, key
        return html.unescape(found.group(1))

    assert row("dataset") == "fashion-mnist"
    assert row("model") == "mlp (hidden [64, 32])"
    assert row("partition") == (
        "dirichlet, α = 0.3; 20 clients, 20% of each client's examples held out for testing"
    )
    assert (
        row("strategy")
        == "fedadam (server_lr = 0.01); fraction_train = 0.5, fraction_evaluate = 0.25"
    )
    assert row("privacy") == (
        "central DP (DP-FedAvg): noise multiplier z = 1.1, clip C = 0.5, δ = 1e-05, "
        "ε = 2.35 spent after round 2"
    )


def test_report_summary_leaves_out_what_is_off(tmp_path: Path) -> None:
    history = without_plots(make_history(rounds=1))
    history["config"].update(
        {
            "data": {"dataset": "digits", "partition": "iid"},
            "model": {"name": "cnn", "hidden": [64]},  # the CNN does not read hidden
            "strategy": {"name": "fedavg"},
            "privacy": {"mode": "none", "noise_multiplier": 1.0},
            "compression": {"uplink": "none", "downlink": "none"},
        }
    )
    write_history(tmp_path / "history.json", history)
    page = write_report(tmp_path).read_text()
    assert '<th class="key">model</th><td class="key">cnn</td>' in page
    assert '<th class="key">partition</th><td class="key">iid</td>' in page
    assert '<th class="key">strategy</th><td class="key">fedavg</td>' in page
    for absent in (">privacy<", ">compression<", ">environment<", ">secure aggregation<"):
        assert absent not in page


def test_report_tables_scroll_in_their_own_box(tmp_path: Path) -> None:
    history = without_plots(make_history(rounds=2))
    history["rounds"][0]["failures"] = [{"client_id": 3, "task": "train", "reason": "x" * 300}]
    for i in range(60):  # a table far wider than the page
        history["rounds"][0]["train"]["metrics"][f"metric_with_a_long_name_{i}"] = float(i)
    write_history(tmp_path / "history.json", history)
    page = write_report(tmp_path).read_text()

    tables = [m.start() for m in re.finditer("<table", page)]
    assert len(tables) == 3  # summary, rounds, failures
    for start in tables:
        assert page[:start].endswith('<div class="scroll">')
    css = page[page.index("<style>") : page.index("</style>")]
    rule = re.search(r"\.scroll \{([^}]*)\}", css)
    assert rule and "overflow-x: auto" in rule.group(1)
    body_rule = re.search(r"body \{([^}]*)\}", css)
    assert body_rule and "max-width" in body_rule.group(1)


@pytest.mark.slow  # a whole (one-round) run: about 5 s alone, more on a busy machine
def test_run_prints_one_round_in_the_singular(tmp_path: Path, capsys: Any) -> None:
    from pollinate.cli import main

    out = tmp_path / "run"
    settings = {
        "run.rounds": "1",
        "run.output": f'"{out}"',
        "simulation.backend": '"sequential"',
        "data.num_clients": "3",
        "data.partition": '"dirichlet"',
        "model.name": '"logreg"',
        "train.epochs": "1",
    }
    args = ["run", *(a for k, v in settings.items() for a in ("--set", f"{k}={v}"))]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "finished 1 round:" in printed and "1 rounds" not in printed
    page = (out / "report.html").read_text()
    for words in ("digits", "logreg", "dirichlet, α = 0.5; 3 clients", "fedavg"):
        assert html.escape(words) in page, words


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


def test_report_summary_of_a_resolved_config_names_only_what_the_model_reads() -> None:
    """A resolved config holds every [model] key; the tree keys belong to XGBoost only."""
    from pollinate import config
    from pollinate.report.summary import describe_experiment

    def model_row(*sets: str) -> str:
        return dict(describe_experiment(config.load(None, list(sets)).to_dict()))["model"]

    assert model_row() == "mlp (hidden [64], framework torch)"
    assert model_row("model.name=cnn", "model.framework=keras") == "cnn (framework keras)"
    trees = model_row(
        "model.framework=xgboost",
        "model.name=gbtree",
        "model.max_depth=3",
        "strategy.name=fedxgb_bagging",
    )
    assert trees == "gbtree (framework xgboost, max_depth 3, eta 0.3, local_rounds 1)"
