"""What every experiment tracker logs, and how a tracker fails without stopping the run.

A tracker is a ``Callback``. Per round (step = the round number) it logs the round's numbers
as flat names, ``metrics.csv``'s columns with ``/`` for ``_``:

- ``centralized/loss``, ``centralized/accuracy``, ``federated/…`` (every number in the section);
- ``train/clients``, ``train/failures``, ``train/timeouts``, ``train/rejected`` and the
  aggregated training metrics (``train.metrics.loss`` → ``train/loss``, or
  ``train/metrics/loss`` when that name is taken);
- ``privacy/epsilon`` (and the other numbers of ``privacy``) when the round was private;
- ``wall_s``, the seconds since the run started;
- per client, for at most ``max_clients_logged`` clients (see ``ClientPanel``):
  ``client/<id>/num_examples``, ``client/<id>/train/<metric>``,
  ``client/<id>/evaluate/<metric>``.

Strings, flags and non-finite numbers are left out, as in ``metrics.csv``. The resolved config
is logged as parameters named ``section.key``; at the end of the run the run folder's plots,
``report.html``, ``history.json`` and ``checkpoints/last.npz`` are logged as artifacts.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from pollinate.errors import ConfigError, missing_dependency
from pollinate.server import Callback, History
from pollinate.types import Arrays

log = logging.getLogger("pollinate")

# a round record's entries that are bookkeeping or per-client detail, not per-round numbers
_NOT_METRICS = ("round", "wall_s", "clients", "failures")

Status = str  # "finished" | "failed" | "killed"


def _number(value: Any) -> float | None:
    """``value`` as a float if it is a finite real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def round_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """A round's numbers as flat ``section/key`` names (see the module docstring)."""
    metrics: dict[str, float] = {}
    wall_s = _number(record.get("wall_s"))
    if wall_s is not None:
        metrics["wall_s"] = wall_s
    for section, value in record.items():
        if section in _NOT_METRICS:
            continue
        if isinstance(value, Mapping):
            _flatten_into(metrics, str(section), value)
        elif (number := _number(value)) is not None:
            metrics[str(section)] = number
    return metrics


def _flatten_into(out: dict[str, float], prefix: str, values: Mapping[str, Any]) -> None:
    nested = []
    for key, value in values.items():
        if isinstance(value, Mapping):
            nested.append((str(key), value))
        elif (number := _number(value)) is not None:
            out[f"{prefix}/{key}"] = number
    for key, value in nested:  # after the scalars, so a section's own keys win a name clash
        if key == "metrics":
            for name, metric in value.items():
                if (number := _number(metric)) is None:
                    continue
                tag = f"{prefix}/{name}"
                out[tag if tag not in out else f"{prefix}/metrics/{name}"] = number
        else:
            _flatten_into(out, f"{prefix}/{key}", value)


def _id_order(client_id: str) -> tuple[int, int | str]:
    return (0, int(client_id)) if client_id.isdigit() else (1, client_id)


class ClientPanel:
    """The clients whose own metrics are logged, so a run with many clients stays readable.

    The first ``limit`` clients to take part (lowest ids first within a round) join the panel
    and are followed for the whole run: each round logs the panel's members that took part,
    so at most ``limit`` clients per round and ``limit`` curves per metric in all. ``limit = 0``
    logs no client.
    """

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ConfigError(f"max_clients_logged must be >= 0, got {limit}")
        self.limit = limit
        self.members: set[str] = set()

    def select(self, client_ids: Iterable[str]) -> list[str]:
        present = sorted((str(c) for c in client_ids), key=_id_order)
        for client_id in present:
            if len(self.members) >= self.limit:
                break
            self.members.add(client_id)
        return [c for c in present if c in self.members]


def client_metrics(clients: Mapping[str, Any], client_ids: Iterable[str]) -> dict[str, float]:
    """``client/<id>/…`` numbers of the round record's ``clients`` entries ``client_ids``."""
    metrics: dict[str, float] = {}
    for client_id in client_ids:
        entry = clients.get(client_id) or {}
        prefix = f"client/{client_id}"
        if (n := _number(entry.get("num_examples"))) is not None:
            metrics[f"{prefix}/num_examples"] = n
        for task in ("train", "evaluate"):
            for name, value in (entry.get(task) or {}).items():
                if (number := _number(value)) is not None:
                    metrics[f"{prefix}/{task}/{name}"] = number
    return metrics


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as ``section.key`` parameters; lists and other values as JSON text."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, prefix=f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


def run_artifacts(run_folder: Path) -> list[tuple[Path, str]]:
    """The run folder's files worth keeping with a tracked run, as (file, folder in the run):
    the plots, ``report.html``, ``history.json`` and ``checkpoints/last.npz``, those present."""
    files = [(p, "") for p in sorted(run_folder.glob("*.png"))]
    files += [(run_folder / name, "") for name in ("report.html", "history.json")]
    files.append((run_folder / "checkpoints" / "last.npz", "checkpoints"))
    return [(path, folder) for path, folder in files if path.is_file()]


def require(module: str, package: str | None = None) -> None:
    """Raise ``MissingDependencyError`` (``pip install 'pollinate[tracking]'``) if ``module``
    cannot be imported; it is not imported here (the trackers import on first use)."""
    if find_spec(module) is None:
        raise missing_dependency(package or module, "tracking")


def _status(error: BaseException | None) -> Status:
    if error is None:
        return "finished"
    if isinstance(error, KeyboardInterrupt):
        return "killed"
    from pollinate.privacy.accounting import PrivacyBudgetExceeded

    # a clean stop: the completed rounds are the run
    return "finished" if isinstance(error, PrivacyBudgetExceeded) else "failed"


class Tracker(Callback):
    """Base of the experiment trackers: what is logged, when, and failing safely.

    A subclass implements ``_start``, ``_log_params``, ``_log_metrics``, ``_log_artifacts``
    and ``_finish``. Whatever they raise is caught: the first error is logged as one warning,
    the tracker stops logging for the rest of the run (it closes its run if it can), and the
    run itself goes on. ``config`` (a nested dict such as ``History.config``; by default the
    history's at the end of the run) is logged as parameters; ``run_folder``'s files are
    logged at the end, so put a tracker after the ``RunFolderWriter`` that writes them.
    """

    library = "tracker"

    def __init__(
        self,
        *,
        config: Mapping[str, Any] | None = None,
        run_folder: str | Path | None = None,
        max_clients_logged: int = 20,
    ) -> None:
        self.config = dict(config) if config else {}
        self.run_folder = Path(run_folder) if run_folder is not None else None
        self.clients = ClientPanel(max_clients_logged)
        self._open = False
        self._failed = False
        self._params_logged = False

    # -- what a tracker implements ------------------------------------------------------------

    def _start(self) -> None:
        """Open the tracked run."""
        raise NotImplementedError

    def _log_params(self, params: dict[str, Any]) -> None:
        """Log ``section.key`` parameters."""
        raise NotImplementedError

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log one round's numbers at ``step``, its round number."""
        raise NotImplementedError

    def _log_artifacts(self, files: list[tuple[Path, str]], step: int) -> None:
        """Log the run folder's files, each into its folder of the tracked run."""
        raise NotImplementedError

    def _finish(self, status: Status) -> None:
        """Close the tracked run as ``finished``, ``failed`` or ``killed``."""
        raise NotImplementedError

    # -- the callback -------------------------------------------------------------------------

    def on_run_start(self, rounds: int, start_round: int) -> None:
        self._safely(self._begin)

    def on_round_end(self, record: dict[str, Any], arrays: Arrays) -> None:
        self._safely(lambda: self._round(record))

    def on_run_end(self, history: History, error: BaseException | None) -> None:
        self._safely(lambda: self._end(history, error))

    def _begin(self) -> None:
        if self._open:
            return
        self._start()
        self._open = True
        if self.config:
            self._log_params(flatten_config(self.config))
            self._params_logged = True

    def _round(self, record: Mapping[str, Any]) -> None:
        self._begin()
        metrics = round_metrics(record)
        clients = record.get("clients") or {}
        metrics.update(client_metrics(clients, self.clients.select(clients)))
        self._log_metrics(metrics, int(record["round"]))

    def _end(self, history: History, error: BaseException | None) -> None:
        self._begin()
        if not self._params_logged and history.config:
            self._log_params(flatten_config(history.config))
            self._params_logged = True
        if self.run_folder is not None and history.rounds:
            files = run_artifacts(self.run_folder)
            if files:
                self._log_artifacts(files, int(history.rounds[-1]["round"]))
        self._open = False
        self._finish(_status(error))

    def _safely(self, step: Callable[[], None]) -> None:
        if self._failed:
            return
        try:
            step()
        except Exception as exc:
            self._failed = True
            log.warning(
                "%s stopped logging this run: %s: %s (the run goes on; its run folder keeps "
                "every round)",
                self.library,
                type(exc).__name__,
                exc,
            )
            if self._open:  # close what was opened, quietly: it already failed once
                self._open = False
                try:
                    self._finish("failed")
                except Exception:
                    log.debug("%s could not close its run", self.library, exc_info=True)
