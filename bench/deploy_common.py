"""What the deployment benchmarks share: light clients, child processes, a machine line."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pollinate.client import ClientContext  # noqa: E402
from pollinate.types import Arrays, Config, EvaluateRes, TrainRes  # noqa: E402


class LightClient:
    """Client ``i`` holds ``i + 1`` examples; training adds ``i`` to every parameter."""

    def __init__(self, cid: int) -> None:
        self.cid = cid

    def train(self, arrays: Arrays, config: Config) -> TrainRes:
        return TrainRes(
            [a + np.float32(self.cid) for a in arrays],
            num_examples=self.cid + 1,
            metrics={"loss": float(self.cid)},
        )

    def evaluate(self, arrays: Arrays, config: Config) -> EvaluateRes:
        loss = float(np.abs(arrays[0] - self.cid).mean())
        return EvaluateRes(loss, num_examples=self.cid + 1)


class LightClientFn:
    """Picklable ``client_fn`` building ``LightClient``s."""

    def __call__(self, ctx: ClientContext) -> LightClient:
        return LightClient(ctx.client_id)


class EchoClient:
    """Training returns exactly the Arrays it was given."""

    def train(self, arrays: Arrays, config: Config) -> TrainRes:
        return TrainRes(list(arrays), num_examples=1)

    def evaluate(self, arrays: Arrays, config: Config) -> EvaluateRes:
        return EvaluateRes(0.0, num_examples=1)


def echo_client_fn(ctx: ClientContext) -> EchoClient:
    return EchoClient()


def spawn(script: str, *args: str, capture: bool = True) -> subprocess.Popen[str]:
    """Run ``script`` with ``args`` in a child process (one math thread); it exits when its
    stdin closes, so ``stop_process`` ends it even if this process is killed first."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(Path(script).resolve()), *args],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE if capture else None,
        env=env,
        text=True,
    )


def stop_process(proc: subprocess.Popen[str] | None, wait_s: float = 30) -> None:
    """Close the child's stdin (its signal to stop), then kill it if it lingers."""
    if proc is None:
        return
    try:
        if proc.stdin is not None:
            proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def machine_line() -> str:
    load = os.getloadavg()
    return (
        f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
