"""Running the app's command line as a user does: in its own session, until Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import psutil

from tests.conftest import ROOT


def process_tree(pid: int) -> dict[int, str]:
    """`pid` and every process below it: pid -> command line (shortened)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return {}
    out = {}
    for p in procs:
        try:
            out[p.pid] = " ".join(p.cmdline())[:120] or p.name()
        except psutil.Error:
            continue
    return out


def still_alive(pids: dict[int, str]) -> dict[int, str]:
    alive = {}
    for pid, cmd in pids.items():
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive[pid] = cmd
        except psutil.Error:
            continue
    return alive


@dataclass
class Served:
    """A running command: its output so far and every process seen below it."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    seen: dict[int, str] = field(default_factory=dict)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def look(self) -> dict[int, str]:
        """Record the processes below the command now; returns all seen so far."""
        self.seen |= process_tree(self.proc.pid)
        return self.seen


@contextmanager
def served(
    command: list[str], startup_timeout_s: float, *, kill: bool = False, env: dict[str, str] | None = None
) -> Iterator[Served]:
    """Run `command` until it prints "Ready in"; on exit, Ctrl-C it and check that it said
    "Stopped." and left no process behind. With `kill`, SIGKILL the command alone instead (as
    the OOM killer or a process manager would) and check only that nothing is left."""
    # A new session, so that the "Ctrl-C" below reaches the command and everything it started,
    # as a terminal's SIGINT reaches its foreground process group. The command starts with
    # SIGINT ignored, as a shell's background job or some CI runners start it: Ctrl-C must
    # stop it all the same, and these tests must not depend on how pytest was started.
    proc = subprocess.Popen(
        ["/bin/sh", "-c", 'trap "" INT; exec "$@"', "sh", *command],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    run = Served(proc)
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            run.lines.append(line)
            if line.startswith("Ready in"):
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not ready.is_set():
            assert proc.poll() is None, "the command exited early:\n" + run.output
            assert time.monotonic() < deadline, "the command did not get ready:\n" + run.output
            run.look()
            time.sleep(1.0)
        run.look()
        yield run
    finally:
        if kill:
            proc.kill()
        else:
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        reader.join(timeout=5)
    assert kill or "Stopped." in run.output, run.output
    left: dict[int, str] = {}
    for _ in range(20):  # the kernel may need a moment to reap
        left = still_alive(run.seen)
        if not left:
            break
        time.sleep(0.5)
    assert not left, f"processes left behind after {'the kill' if kill else 'Ctrl-C'}: {left}"
