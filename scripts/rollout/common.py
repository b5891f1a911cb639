"""What every part of the rollout harness shares: bounded subprocess calls,
Docker helpers that only touch what this run created, a cleanup stack that
runs on every exit, and logging.

Every Docker object a run creates carries the label
``dev.shoal.harness.run=<run id>`` and a name that starts with
``shoal-harness-``, so the cleanup (and a human) can find exactly those.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Callable, Iterable, Sequence

PREFIX = "shoal-harness"
RUN_LABEL = "dev.shoal.harness.run"
_T0 = time.monotonic()


class HarnessError(Exception):
    """A step of the harness failed; the message says which and why."""


def log(component: str, message: str) -> None:
    print(f"== {component} [{time.monotonic() - _T0:6.1f}s]: {message}", file=sys.stderr, flush=True)


def run(args: Sequence[str], *, timeout: float = 60, check: bool = True, input: str | None = None) -> str:
    """Runs a command with a deadline and returns its stdout."""
    try:
        done = subprocess.run(
            list(args), input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise HarnessError(f"{' '.join(args[:4])}…: no answer within {timeout}s") from e
    if check and done.returncode != 0:
        raise HarnessError(f"{' '.join(args)}: exit {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done.stdout


def docker(*args: str, timeout: float = 60, check: bool = True, input: str | None = None) -> str:
    return run(["docker", *args], timeout=timeout, check=check, input=input)


class Cleanup:
    """A stack of undo actions, run in reverse on exit, each bounded and
    allowed to fail (the next one still runs). SIGTERM and SIGINT become
    SystemExit so that ``finally`` blocks and this stack run."""

    def __init__(self) -> None:
        self._actions: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, action: Callable[[], None]) -> None:
        self._actions.append((what, action))

    def run(self) -> None:
        while self._actions:
            what, action = self._actions.pop()
            try:
                action()
            except Exception as e:  # noqa: BLE001 - cleanup must go on
                log("cleanup", f"{what}: {e}")

    def install_signal_handlers(self) -> None:
        def stop(signum: int, _frame: object) -> None:
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)


def remove_run_objects(run_id: str) -> None:
    """Removes every container, network and volume labelled with this run."""
    label = f"label={RUN_LABEL}={run_id}"
    ids = docker("ps", "-aq", "--filter", label, check=False).split()
    if ids:
        docker("rm", "-f", "-v", *ids, timeout=120, check=False)
    for kind in ("network", "volume"):
        ids = docker(kind, "ls", "-q", "--filter", label, check=False).split()
        if ids:
            docker(kind, "rm", *ids, timeout=60, check=False)


def inspect(container: str) -> dict:
    out = docker("inspect", container, check=False)
    try:
        return json.loads(out)[0]
    except (ValueError, IndexError):
        return {}


def container_ip(container: str, network: str) -> str:
    info = inspect(container)
    ip = info.get("NetworkSettings", {}).get("Networks", {}).get(network, {}).get("IPAddress", "")
    if not ip:
        raise HarnessError(f"{container} has no address on {network}")
    return ip


def wait_until(what: str, condition: Callable[[], bool], timeout: float, interval: float = 0.25) -> float:
    """Polls ``condition`` until it holds; returns the seconds it took."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        if condition():
            return time.monotonic() - start
        if time.monotonic() >= deadline:
            raise HarnessError(f"{what}: not within {timeout:.0f}s")
        time.sleep(interval)


def image_exists(image: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", image], capture_output=True, timeout=30).returncode == 0


def tail_logs(containers: Iterable[str], lines: int = 30) -> None:
    for name in containers:
        out = docker("logs", "--tail", str(lines), name, check=False, timeout=30)
        err = subprocess.run(
            ["docker", "logs", "--tail", str(lines), name], capture_output=True, text=True, timeout=30
        ).stderr
        print(f"---- {name} (last {lines} lines)\n{out}{err}", file=sys.stderr)


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
