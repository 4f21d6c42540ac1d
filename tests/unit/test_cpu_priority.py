"""Batch work at idle CPU priority (serve_app.serving.cpu_priority): a replica's engine
processes run under SCHED_IDLE exactly while it has no interactive request in flight."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

from serve_app.config import ModelConfig
from serve_app.engine.fake import FakeEngine
from serve_app.engine.protocol import Head, Route
from serve_app.serving.cpu_priority import (
    SUPPORTED,
    CpuPriority,
    can_leave_idle,
    set_policy,
    thread_ids,
    with_descendants,
)
from tests.support.inprocess import fake, run, start_server

pytestmark = pytest.mark.skipif(not SUPPORTED, reason="SCHED_IDLE is Linux's")
may_leave_idle = pytest.mark.skipif(
    not (SUPPORTED and can_leave_idle()), reason="this user may not take a thread out of SCHED_IDLE"
)

# A process with a second thread: the policy is per thread, and an engine core has many.
TWO_THREADS = (
    "import threading, time; threading.Thread(target=time.sleep, args=(60,)).start(); time.sleep(60)"
)


@pytest.fixture
def engine_process() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-c", TWO_THREADS])
    try:
        while len(thread_ids(proc.pid)) < 2:
            pass
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def policies(pid: int) -> set[int]:
    return {os.sched_getscheduler(tid) for tid in thread_ids(pid)}


IDLE = {os.SCHED_IDLE} if SUPPORTED else set()
NORMAL = {os.SCHED_OTHER} if SUPPORTED else set()


@may_leave_idle
def test_idle_while_no_interactive_request_is_in_flight(engine_process: int) -> None:
    priority = CpuPriority("m", [engine_process])
    assert policies(engine_process) == IDLE
    first = priority.begin()
    assert policies(engine_process) == NORMAL
    second = priority.begin()
    first()
    first()  # ending twice counts once
    assert priority.interactive == 1
    assert policies(engine_process) == NORMAL
    second()
    assert priority.interactive == 0
    assert policies(engine_process) == IDLE


@may_leave_idle
def test_an_engines_processes_are_its_core_and_those_below() -> None:
    """vLLM's engine core computes in worker processes it starts: they switch with it."""
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import subprocess, sys; subprocess.run([sys.executable, '-c', {TWO_THREADS!r}])",
        ]
    )
    try:
        while len(with_descendants([parent.pid])) < 2:
            pass
        found = with_descendants([parent.pid, 2**22 + 1])  # the second is no process
        assert found[0] == parent.pid
        assert len(found) == 2
        CpuPriority("m", [parent.pid])  # the engine core alone: its workers switch with it
        assert all(policies(pid) == IDLE for pid in found)
    finally:
        for pid in reversed(with_descendants([parent.pid])):
            os.kill(pid, 9)
        parent.wait()


def test_off_leaves_the_policy_alone(engine_process: int) -> None:
    priority = CpuPriority("m", [engine_process], enabled=False)
    priority.begin()()
    assert policies(engine_process) == NORMAL


def test_a_process_gone_is_skipped() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    CpuPriority("m", [proc.pid]).begin()()


def test_a_replica_that_could_not_leave_idle_again_never_enters_it() -> None:
    """Taking a thread out of SCHED_IDLE needs root, CAP_SYS_NICE or RLIMIT_NICE 20: without
    them (a plain user, the default limit) the engine is left alone rather than stuck idle.
    Checked as root by dropping to `nobody` first."""
    script = textwrap.dedent(
        """
        import json, os, resource, threading, time
        from serve_app.serving.cpu_priority import CpuPriority, can_leave_idle, thread_ids
        resource.setrlimit(resource.RLIMIT_NICE, (0, 0))  # a plain user's default
        if os.getuid() == 0:  # everything imported first: the interpreter may lie under /root
            os.setgid(65534)
            os.setuid(65534)
        child = os.fork()
        if child == 0:
            threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
            time.sleep(60)
            os._exit(0)
        while len(thread_ids(child)) < 2:
            pass
        priority = CpuPriority("m", [child])
        seen = sorted({os.sched_getscheduler(t) for t in thread_ids(child)})
        os.kill(child, 9)
        print(json.dumps([os.getuid(), can_leave_idle(), priority.enabled, seen]))
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=60, check=True
    )
    uid, can, enabled, seen = json.loads(out.stdout)
    assert uid != 0
    assert (can, enabled, seen) == (False, False, [os.SCHED_OTHER])


def test_set_policy_raises_on_processes_not_ours() -> None:
    if os.getuid() == 0:
        pytest.skip("root may set any process's policy")
    with pytest.raises(PermissionError):
        set_policy([1], idle=True)


class CoreInProcess(FakeEngine):
    """The fake engine, its compute said to run in a child process (as vLLM's engine core)."""

    pid = 0
    in_check: set[int] = set()

    @property
    def core_pids(self) -> list[int]:
        return [self.pid]

    async def check_health(self) -> None:
        CoreInProcess.in_check = policies(self.pid)


@may_leave_idle
def test_a_replica_raises_its_engine_for_interactive_requests_and_health_checks_only(
    engine_process: int,
) -> None:
    CoreInProcess.pid = engine_process
    model = ModelConfig(**fake("small", engine_args={"ttft_s": 0.05}))
    body = json.dumps({"model": "small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})

    async def during(server: Any, batch: bool) -> set[int]:
        seen: set[int] = set()
        async for item in server.generate(Route.CHAT, body.encode(), "r", batch=batch):
            if isinstance(item, Head):
                seen = policies(engine_process)
        return seen

    async def in_health_check(server: Any) -> set[int]:
        await server.check_health()  # the engine's probe: it must not wait behind a busy machine
        return CoreInProcess.in_check

    async def scenario() -> list[set[int]]:
        server = await start_server(model, engine_cls=CoreInProcess, idle_cpu_priority=True)
        try:
            return [
                policies(engine_process),
                await during(server, batch=False),
                policies(engine_process),
                await during(server, batch=True),
                await in_health_check(server),
                policies(engine_process),
            ]
        finally:
            await server.stop()

    assert run(scenario) == [IDLE, NORMAL, IDLE, IDLE, NORMAL, IDLE]
