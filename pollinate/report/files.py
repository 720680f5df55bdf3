"""Run files: history.json, metrics.csv and other JSON, written atomically.

Every writer goes through a temporary file in the target folder and ``os.replace``, so a
reader (or a run that crashes mid-write) never sees a half-written file. JSON is always
valid: NumPy scalars and arrays become plain numbers and lists, and non-finite floats
(NaN, ±inf) become ``null`` — a metric that could not be computed is absent, never faked.
"""

from __future__ import annotations

import csv
import json
import math
import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

from pollinate.errors import DataError

HISTORY_FILE = "history.json"
METRICS_FILE = "metrics.csv"

# Fixed leading columns of metrics.csv, in order; any other scalar metric follows them.
METRICS_COLUMNS = (
    "round",
    "wall_s",
    "centralized_loss",
    "centralized_accuracy",
    "federated_loss",
    "federated_accuracy",
    "train_clients",
    "train_failures",
)
# Round entries that are per-client detail, not per-round scalars.
_NOT_FLATTENED = ("round", "wall_s", "clients", "failures")
# A nested table of this name is per-client detail too (e.g. environment.clients), whatever
# section it is in: one column per client would grow the table with the population.
_PER_CLIENT = "clients"

CellValue = int | float | str | bool | None


@contextmanager
def atomic_open(path: str | os.PathLike[str], binary: bool = False) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` and move it onto ``path`` when the block ends.

    If the block raises, the temporary file is removed and ``path`` is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    # os.open with 0o666 honours the umask (mkstemp would leave the file private, 0o600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        if binary:
            handle: IO[Any] = os.fdopen(fd, "wb")
        else:
            handle = os.fdopen(fd, "w", encoding="utf-8", newline="")
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def to_json_safe(obj: Any, where: str = "value") -> Any:
    """Return ``obj`` as plain JSON types: NumPy → Python, non-finite floats → None.

    Dict keys become strings (client ids are ints in memory, strings in JSON). Raises
    TypeError naming the offending location for objects JSON cannot hold.
    """
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, np.generic):
        return to_json_safe(obj.item(), where)
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): to_json_safe(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return to_json_safe(obj.tolist(), where)
    if isinstance(obj, (list, tuple)):
        return [to_json_safe(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(
        f"{where} is a {type(obj).__name__}, which JSON cannot hold; "
        "convert it to a number, string, list or dict first"
    )


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (NaN/inf → null) and return the path."""
    text = json.dumps(to_json_safe(obj, "obj"), indent=2, allow_nan=False, ensure_ascii=False)
    with atomic_open(path) as handle:
        handle.write(text + "\n")
    return Path(path)


def write_history(path: str | os.PathLike[str], history: Mapping[str, Any]) -> Path:
    """Write a run's history (``{"config": {...}, "rounds": [...]}``) to ``path`` atomically."""
    return HistoryFile(path).write(history)


class HistoryFile:
    """``history.json``, rewritten atomically after every round without encoding the earlier
    rounds again: each round's JSON text is kept once written, so a round costs its own
    encoding plus one file write, not a re-encoding of the whole run (which grows with
    rounds × clients). The text is exactly ``json.dumps(history, indent=2)``.

    Rounds are taken to be append-only; a history with fewer rounds than were written
    (a new run into the same writer) starts the cache over.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._rounds: list[str] = []  # each round's text, indented as inside the file

    def write(self, history: Mapping[str, Any]) -> Path:
        _check_history(history, "history")
        rounds = history["rounds"]
        if len(rounds) < len(self._rounds):
            self._rounds = []
        for entry in rounds[len(self._rounds) :]:
            self._rounds.append(_indented(_dumps(entry, "history round"), 4))
        others = {k: v for k, v in history.items() if k != "rounds"}
        head = _dumps(others, "history")[:-2]  # without its closing "\n}"
        if rounds:
            body = '"rounds": [\n' + ",\n".join(self._rounds) + "\n  ]"
        else:
            body = '"rounds": []'
        text = (head + ",\n  " if others else "{\n  ") + body + "\n}"
        with atomic_open(self.path) as handle:
            handle.write(text + "\n")
        return self.path


def _dumps(obj: Any, what: str) -> str:
    return json.dumps(to_json_safe(obj, what), indent=2, allow_nan=False, ensure_ascii=False)


def _indented(text: str, spaces: int) -> str:
    pad = " " * spaces
    return "\n".join(pad + line for line in text.split("\n"))


def read_history(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a history.json (or the history.json inside a run folder ``path``).

    Raises DataError naming the file when it is missing, not valid JSON, or not a history.
    """
    file = Path(path)
    if file.is_dir():
        file = file / HISTORY_FILE
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(
            f"no history file at {file}; pass the history.json (or run folder) that "
            "`pollinate run` wrote"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read history file {file}: {exc}") from exc
    try:
        history = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"history file {file} is not valid JSON ({exc}); it may have been truncated "
            "or edited by hand — rerun the experiment to rewrite it"
        ) from exc
    _check_history(history, str(file))
    history.setdefault("config", {})
    return history


def _check_history(history: object, source: str) -> None:
    """Raise DataError unless ``history`` has the shape ``{"rounds": [{"round": n, ...}]}``."""
    if not isinstance(history, Mapping):
        raise DataError(f"{source}: a history must be a JSON object, got {type(history).__name__}")
    rounds = history.get("rounds")
    if not isinstance(rounds, list):
        raise DataError(f"{source}: a history needs a 'rounds' list (see the history schema)")
    config = history.get("config", {})
    if not isinstance(config, Mapping):
        raise DataError(f"{source}: 'config' must be an object, got {type(config).__name__}")
    for i, entry in enumerate(rounds):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("round"), (int, np.integer)):
            raise DataError(f"{source}: rounds[{i}] must be an object with an integer 'round'")


def flatten_round(entry: Mapping[str, Any]) -> dict[str, CellValue]:
    """One round as flat ``section_key`` scalars (e.g. ``centralized_accuracy``).

    ``train.metrics.loss`` becomes ``train_loss`` (``train_metrics_loss`` if that name is
    taken); per-client detail (``clients``, ``failures``, and a ``clients`` table inside any
    section, such as ``environment.clients``) is left out. Non-finite → None.
    """
    flat: dict[str, CellValue] = {
        "round": _cell(entry.get("round")),
        "wall_s": _cell(entry.get("wall_s")),
    }
    for section, value in entry.items():
        if section in _NOT_FLATTENED:
            continue
        if isinstance(value, Mapping):
            _flatten_into(flat, section, value)
        elif _is_scalar(value):
            flat[section] = _cell(value)
    return flat


def _flatten_into(flat: dict[str, CellValue], prefix: str, values: Mapping[str, Any]) -> None:
    nested = []
    for key, value in values.items():
        if isinstance(value, Mapping):
            if key != _PER_CLIENT:
                nested.append((str(key), value))
        elif _is_scalar(value):
            flat[f"{prefix}_{key}"] = _cell(value)
    for key, value in nested:  # after the scalars, so a section's own keys win a name clash
        if key == "metrics":
            for name, metric in value.items():
                if not _is_scalar(metric):
                    continue
                column = f"{prefix}_{name}"
                if column in flat:
                    column = f"{prefix}_metrics_{name}"
                flat[column] = _cell(metric)
        else:
            _flatten_into(flat, f"{prefix}_{key}", value)


def _is_scalar(value: object) -> bool:
    return value is None or isinstance(value, (int, float, str, bool, np.generic))


def _cell(value: object) -> CellValue:
    """A JSON-safe scalar: NumPy → Python; None, NaN and ±inf → None (an empty cell)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (int, float, str, bool)):
        return value
    return None


def finite_number(value: object) -> float | None:
    """``value`` as a float if it is a finite real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def metric_series(
    history: Mapping[str, Any], section: str, key: str
) -> tuple[list[int], list[float]]:
    """Rounds and values of ``round[section][key]`` (e.g. "centralized", "accuracy").

    Rounds where the metric is absent, null or non-finite are skipped.
    """
    rounds: list[int] = []
    values: list[float] = []
    for entry in history.get("rounds", []):
        metrics = entry.get(section)
        value = finite_number(metrics.get(key)) if isinstance(metrics, Mapping) else None
        if value is not None:
            rounds.append(int(entry["round"]))
            values.append(value)
    return rounds, values


def metrics_table(history: Mapping[str, Any]) -> tuple[list[str], list[dict[str, CellValue]]]:
    """The per-round table: column names (fixed ones first) and one flat row per round."""
    rows = [flatten_round(entry) for entry in history.get("rounds", [])]
    columns = list(METRICS_COLUMNS)
    seen = set(columns)
    for row in rows:
        for name in row:
            if name not in seen:
                seen.add(name)
                columns.append(name)
    return columns, rows


def write_metrics_csv(path: str | os.PathLike[str], history: Mapping[str, Any]) -> Path:
    """Write one CSV row per round; a metric that was not computed is an empty cell."""
    columns, rows = metrics_table(history)
    with atomic_open(path) as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else row[c] for c in columns])
    return Path(path)
