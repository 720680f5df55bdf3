"""TensorBoard: event files written with the ``tensorboard`` package alone (no TensorFlow,
no torch)."""

from __future__ import annotations

import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pollinate.errors import ConfigError
from pollinate.tracking.base import Status, Tracker, require

_PNG = b"\x89PNG\r\n\x1a\n"


def _png_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a PNG's header, or None if ``data`` is not a PNG."""
    if not data.startswith(_PNG) or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return height, width


class TensorBoardTracker(Tracker):
    """Logs a run as TensorBoard events in ``log_dir``: scalars at step = round number (see
    ``pollinate.tracking.base`` for the names), the config as HParams, and the run folder's
    plots as images at the last round. Look at it with ``tensorboard --logdir <log_dir>``.

    ``log_dir`` defaults to ``<run folder>/tensorboard``.
    """

    library = "TensorBoard"

    def __init__(
        self,
        log_dir: str | Path | None = None,
        *,
        config: Mapping[str, Any] | None = None,
        run_folder: str | Path | None = None,
        max_clients_logged: int = 20,
    ) -> None:
        super().__init__(
            config=config, run_folder=run_folder, max_clients_logged=max_clients_logged
        )
        if log_dir is None:
            if self.run_folder is None:
                raise ConfigError("TensorBoardTracker needs a log_dir or a run_folder")
            log_dir = self.run_folder / "tensorboard"
        self.log_dir = Path(log_dir)
        require("tensorboard")
        self.writer: Any = None

    def _write(self, step: int, values: list[Any]) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=values)
        self.writer.add_event(Event(step=step, wall_time=time.time(), summary=summary))

    def _start(self) -> None:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.writer = EventFileWriter(str(self.log_dir))

    def _log_params(self, params: dict[str, Any]) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.plugins.hparams.summary_v2 import hparams_pb

        summary = hparams_pb(params)
        self.writer.add_event(Event(step=0, wall_time=time.time(), summary=summary))

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._write(step, [Summary.Value(tag=k, simple_value=v) for k, v in metrics.items()])
        self.writer.flush()  # the round is on disk, for a TensorBoard that is watching

    def _log_artifacts(self, files: list[tuple[Path, str]], step: int) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        images = []
        for path, _ in files:  # only the plots: TensorBoard has no place for other files
            data = path.read_bytes()
            size = _png_size(data)
            if size is None:
                continue
            image = Summary.Image(
                height=size[0], width=size[1], colorspace=4, encoded_image_string=data
            )
            images.append(Summary.Value(tag=f"plots/{path.stem}", image=image))
        if images:
            self._write(step, images)

    def _finish(self, status: Status) -> None:
        self.writer.close()
