"""`make run` serves both demo models, and Ctrl-C leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import httpx
import psutil

from tests.conftest import ROOT
from tests.serve.conftest import free_port

STARTUP_TIMEOUT_S = 420


def _tree(pid: int) -> dict[int, str]:
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


def _alive(pids: dict[int, str]) -> dict[int, str]:
    alive = {}
    for pid, cmd in pids.items():
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive[pid] = cmd
        except psutil.Error:
            continue
    return alive


def test_make_run_serves_both_models_and_ctrl_c_stops_everything() -> None:
    port = free_port()
    # A new session, so that the "Ctrl-C" below reaches make and everything it started,
    # as a terminal's SIGINT reaches its foreground process group.
    proc = subprocess.Popen(
        ["make", "--no-print-directory", "run", f"RUN_ARGS=--port {port}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Ready in"):
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seen: dict[int, str] = {}
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not ready.is_set():
            assert proc.poll() is None, "make run exited early:\n" + "".join(lines)
            assert time.monotonic() < deadline, "make run did not get ready:\n" + "".join(lines)
            seen |= _tree(proc.pid)
            time.sleep(1.0)
        seen |= _tree(proc.pid)
        output = "".join(lines)
        assert f"Serving on http://127.0.0.1:{port}" in output
        assert "replicas ready" in output  # progress was shown while engines loaded
        for model in ("tiny-mistral-v3", "tiny-mistral-tekken"):
            resp = httpx.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
                timeout=60,
            )
            assert resp.status_code == 200, resp.text
            assert resp.json()["usage"]["completion_tokens"] == 3
        seen |= _tree(proc.pid)
        assert any("EngineCore" in c for c in seen.values()), seen
        assert any("raylet" in c for c in seen.values()), seen
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        reader.join(timeout=5)
    assert "Stopped." in "".join(lines), "".join(lines)
    left: dict[int, str] = {}
    for _ in range(20):  # the kernel may need a moment to reap
        left = _alive(seen)
        if not left:
            break
        time.sleep(0.5)
    assert not left, f"processes left behind after Ctrl-C: {left}"
    with httpx.Client() as client:
        try:
            client.get(f"http://127.0.0.1:{port}/health", timeout=2)
            raise AssertionError("the server still answers after Ctrl-C")
        except httpx.TransportError:
            pass
