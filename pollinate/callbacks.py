"""Callbacks that watch a run: live progress, the run folder's files, and checkpoints."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from pollinate.server import Callback, History
from pollinate.types import Arrays, Outcome

log = logging.getLogger("pollinate")


def _fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def headline(record: dict[str, Any]) -> str:
    """The round's key numbers in one short phrase."""
    parts = []
    for section in ("centralized", "federated"):
        acc = record.get(section, {}).get("accuracy")
        if acc is not None:
            parts.append(f"{section} accuracy {acc:.4f}")
    train = record.get("train", {})
    parts.append(f"{train.get('clients', 0)} trained")
    if train.get("failures"):
        parts.append(f"{train['failures']} failed")
    epsilon = _epsilon(record)
    if epsilon:
        parts.append(epsilon)
    return ", ".join(parts)


def _epsilon(record: dict[str, Any]) -> str:
    """``ε 1.23`` when the round was differentially private, else an empty string."""
    privacy = record.get("privacy")
    if not privacy:
        return ""
    epsilon = privacy.get("epsilon")
    if epsilon is None or not math.isfinite(epsilon):
        return "ε inf"
    return f"ε {epsilon:.3g}"


def short_headline(record: dict[str, Any]) -> str:
    """The round's accuracy in a few characters, for the live bar."""
    parts = [_epsilon(record)]
    for section, tag in (("centralized", "acc"), ("federated", "fed acc")):
        acc = record.get(section, {}).get("accuracy")
        if acc is not None:
            parts.insert(0, f"{tag} {acc:.3f}")
            break
    return " ".join(p for p in parts if p)


class ProgressDisplay(Callback):
    """Round i/n, clients done, elapsed and ETA, last accuracy, and ε when private.

    A live bar on a terminal; one plain line per round otherwise; nothing when ``quiet``.
    """

    def __init__(self, quiet: bool = False, stream: TextIO | None = None) -> None:
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.live = not quiet and self.stream.isatty()
        self._progress: Any = None
        self._task: Any = None
        self._rounds = 0
        self._first = 1
        self._started = 0.0
        self._last = ""

    def on_run_start(self, rounds: int, start_round: int) -> None:
        self._rounds, self._first = rounds, start_round
        self._started = time.monotonic()
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("[bold]{task.fields[unit]} {task.fields[round]}/{task.fields[rounds]}"),
                BarColumn(bar_width=16),
                TextColumn("{task.fields[clients]}"),
                TimeElapsedColumn(),
                TextColumn("ETA {task.fields[eta]}"),
                TextColumn("{task.fields[last]}"),
                console=Console(file=self.stream),
                transient=False,
            )
            self._task = self._progress.add_task(
                "run",
                total=rounds - start_round + 1,
                round=start_round,
                rounds=rounds,
                unit="round",
                clients="",
                eta="?",
                last="",
            )
            self._progress.start()

    def _eta(self, done_rounds: int) -> str:
        if done_rounds <= 0:
            return "?"
        per_round = (time.monotonic() - self._started) / done_rounds
        return _fmt_s(per_round * (self._rounds - self._first + 1 - done_rounds))

    def on_round_start(self, round_number: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, round=round_number, clients="sampling")

    def on_task_done(self, round_number: int, outcome: Outcome, done: int, total: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, clients=f"{outcome.kind} {done}/{total}")

    def on_round_end(self, record: dict[str, Any], arrays: Arrays) -> None:
        rnd = record["round"]
        done = rnd - self._first + 1
        self._last = headline(record)
        unit = "step" if "async" in record else "round"  # an asynchronous run's server step
        if self._progress is not None:
            self._progress.update(
                self._task,
                advance=1,
                eta=self._eta(done),
                last=short_headline(record),
                clients="",
                unit=unit,
            )
        elif not self.quiet:
            elapsed = _fmt_s(time.monotonic() - self._started)
            print(
                f"{unit} {rnd}/{self._rounds}: {self._last} "
                f"[{elapsed} elapsed, ETA {self._eta(done)}]",
                file=self.stream,
                flush=True,
            )

    def on_run_end(self, history: History, error: BaseException | None) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def save_checkpoint(
    path: Path, arrays: Arrays, meta: dict[str, Any], state: dict[str, Any] | None = None
) -> None:
    """Write ``arrays``, JSON metadata and (optionally) a strategy's ``state`` to an ``.npz``
    file, atomically."""
    from pollinate.strategy.state import pack

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    named: dict[str, np.ndarray] = {f"arr_{i:04d}": a for i, a in enumerate(arrays)}
    if state:
        tree, state_arrays = pack(state)
        meta = {**meta, "strategy_state": tree}
        named.update(state_arrays)
    np.savez(tmp, __meta__=np.array(json.dumps(meta)), **named)  # type: ignore[arg-type]
    tmp.replace(path)


def load_checkpoint(path: str | Path) -> tuple[Arrays, dict[str, Any]]:
    """Read a checkpoint written by ``save_checkpoint``: (arrays, metadata)."""
    with np.load(path, allow_pickle=False) as data:
        keys = sorted(k for k in data.files if k.startswith("arr_"))
        meta = json.loads(str(data["__meta__"])) if "__meta__" in data.files else {}
        return [data[k] for k in keys], meta


def load_strategy_state(path: str | Path) -> dict[str, Any]:
    """The strategy state saved in a checkpoint (empty when it holds none)."""
    from pollinate.strategy.state import PREFIX, unpack

    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["__meta__"])) if "__meta__" in data.files else {}
        tree = meta.get("strategy_state")
        if not tree:
            return {}
        arrays = {k: data[k] for k in data.files if k.startswith(PREFIX)}
        state: dict[str, Any] = unpack(tree, arrays)
        return state


def _score(record: dict[str, Any]) -> float | None:
    """Higher is better: accuracy (centralized first), else minus the loss."""
    for section in ("centralized", "federated"):
        values = record.get(section, {})
        if values.get("accuracy") is not None:
            return float(values["accuracy"])
    for section in ("centralized", "federated"):
        loss = record.get(section, {}).get("loss")
        if loss is not None and math.isfinite(loss):
            return -float(loss)
    return None


class RunFolderWriter(Callback):
    """Keeps the run folder current: history.json and metrics.csv after every round,
    checkpoints of the last and best global model, plots and the report at the end.

    ``RunFolderWriter("runs/my-run")`` is enough: without a ``history`` it keeps its own
    record of the rounds it sees (a resumed run passes the history holding its earlier
    rounds). ``config`` is written to config.json and history.json (default: the history's);
    ``label_counts`` (clients × classes) draws partitions.png; ``strategy``'s state goes into
    checkpoints/last.npz, for resuming.
    """

    def __init__(
        self,
        output: str | Path,
        history: History | None = None,
        label_counts: np.ndarray | None = None,
        plots: bool = True,
        strategy: Any = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.output = Path(output)
        self._own = history is None  # then on_round_end appends each record itself
        self.history = history if history is not None else History()
        if config is not None:
            self.history.config = config
        self.strategy = strategy
        self.label_counts = label_counts
        self.plots = plots
        # a resumed run's history already holds rounds: best.npz keeps the best of them
        self._best = max(
            (s for s in map(_score, self.history.rounds) if s is not None), default=None
        )
        self.output.mkdir(parents=True, exist_ok=True)
        from pollinate.report.files import HistoryFile

        self._history_file = HistoryFile(self.output / "history.json")

    def on_run_start(self, rounds: int, start_round: int) -> None:
        from pollinate.report import write_json_atomic

        write_json_atomic(self.output / "config.json", self.history.config)

    def on_round_end(self, record: dict[str, Any], arrays: Arrays) -> None:
        score = _score(record)
        best = score is not None and (self._best is None or score > self._best)
        if best:
            self._best = score
        self._write(record, arrays, best)

    def catch_up(self, arrays: Arrays) -> None:
        """On resuming a run whose last recorded round left ``arrays``: redo that round's
        writes (history.json, metrics.csv, last.npz, and best.npz if it was the best round),
        which a server stopped after recording the round but before writing them left undone."""
        if not self.history.rounds:
            return
        record = self.history.rounds[-1]
        score = _score(record)
        earlier = [s for s in map(_score, self.history.rounds[:-1]) if s is not None]
        self._write(record, arrays, score is not None and all(score > s for s in earlier))

    def _write(self, record: dict[str, Any], arrays: Arrays, best: bool) -> None:
        from pollinate.report import write_metrics_csv

        if self._own:
            self.history.rounds.append(record)
        data = self.history.to_dict()
        self._history_file.write(data)
        write_metrics_csv(self.output / "metrics.csv", data)
        meta = {"round": record["round"], "score": _score(record)}
        state = self.strategy.state() if self.strategy is not None else None
        save_checkpoint(self.output / "checkpoints" / "last.npz", arrays, meta, state)
        if best:
            save_checkpoint(self.output / "checkpoints" / "best.npz", arrays, meta)

    def on_run_end(self, history: History, error: BaseException | None) -> None:
        if self._own:  # the run's rounds (earlier ones included), with this writer's config
            self.history.rounds = list(history.rounds)
            self.history.config = self.history.config or history.config
            history = self.history
        if not history.rounds:
            return
        from pollinate.report import write_report, write_run_outputs

        try:
            write_run_outputs(self.output, history.to_dict(), self.label_counts)
            if self.plots:
                write_report(self.output)
        except Exception:  # plots must never hide the run's own outcome
            log.exception("could not write plots or report to %s", self.output)
