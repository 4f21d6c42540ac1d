"""What the benchmark measures, one after another on the same machine: plain `vllm serve`,
`vllm serve` with our replicas' parser-table fix, `vllm serve` with as many frontend processes
as our replica would run, and this app on a private local Ray."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from serve_app.local.front import DEFAULT_FRONT
from serve_app.local.launcher import LocalServe
from serve_app.local.processes import descendants, kill_leftovers
from serve_app.tools.bench.vllm_cli import API_SERVER, vllm_multi_serve_args, vllm_serve_args

if TYPE_CHECKING:
    from serve_app.config import AppConfig, ModelConfig

APP = "bench"
CACHED_SERVER = "serve_app.tools.bench.vllm_cached_server"
LOG_TAIL_LINES = 20


class BenchError(Exception):
    """A failure worth one line (and maybe a log tail), not a traceback."""


def load_bench_model(path: Path, model_id: str | None) -> tuple[AppConfig, ModelConfig]:
    """The app of the serve config at `path` with one model (`model_id`, else its first), its
    Mistral-layout arguments filled in; ConfigError or BenchError if there is none."""
    from serve_app.config import load_app_config, load_serve_file
    from serve_app.serving.builder import resolve_model

    serve_file = load_serve_file(path)
    config = load_app_config(serve_file.args, source=f"{path} (application '{serve_file.app_name}' args)")
    chosen = config.find(model_id) if model_id else config.models[0]
    if chosen is None:
        names = ", ".join(m.id for m in config.models)
        raise BenchError(f"{path}: no model named {model_id!r} (models: {names})")
    model = resolve_model(chosen)
    return config.model_copy(update={"models": (model,)}), model


class Target(Protocol):
    name: str

    @property
    def label(self) -> str:
        """The name in tables and plots."""
        ...

    def start(self) -> str: ...
    def snapshot(self) -> None: ...
    def stop(self) -> None: ...


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.rstrip().splitlines()[-lines:])


def wait_healthy(
    url: str, deadline: float, exited: Callable[[], int | None], tick: Callable[[], None]
) -> str | None:
    """Poll `url`/health until 200; None when healthy, else why not."""
    import httpx

    with httpx.Client(timeout=2) as http:
        while True:
            code = exited()
            if code is not None:
                return f"the server exited with code {code} during start-up"
            with contextlib.suppress(httpx.TransportError):
                if http.get(url + "/health").status_code == 200:
                    return None
            if time.monotonic() > deadline:
                return "the server did not start within the start timeout"
            tick()
            time.sleep(1.0)


class PlainVllm:
    """vLLM's own OpenAI server, in its own session so that its process group can be stopped."""

    name = "vllm"

    def __init__(self, model: ModelConfig, port: int, log_path: Path, timeout_s: float) -> None:
        self.model, self.port, self.log_path, self.timeout_s = model, port, log_path, timeout_s
        self.command = self.server_command(self.serve_args(model, port))
        self.proc: subprocess.Popen[bytes] | None = None
        self.owned: set[int] = set()

    @property
    def label(self) -> str:
        return self.name

    def serve_args(self, model: ModelConfig, port: int) -> list[str]:
        return vllm_serve_args(model, port)

    def environment(self) -> dict[str, str]:
        env = {**os.environ, **self.model.env}
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        return env

    def start(self) -> str:
        env = self.environment()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            log.write(f"$ {shlex.join(self.command)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        url = f"http://127.0.0.1:{self.port}"
        why = wait_healthy(url, time.monotonic() + self.timeout_s, self.proc.poll, self.snapshot)
        if why is not None:
            why = why.replace("start timeout", f"start timeout ({self.timeout_s:.0f} s)")
            raise BenchError(
                f"{self.name}: {why}; last {LOG_TAIL_LINES} lines of {self.log_path}:\n{tail(self.log_path)}"
            )
        return url

    @staticmethod
    def server_command(command: list[str]) -> list[str]:
        return command

    def snapshot(self) -> None:
        self.owned |= descendants()

    def stop(self) -> None:
        if self.proc is None:
            return
        self.snapshot()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        with contextlib.suppress(ProcessLookupError):  # whatever of its group outlived it
            os.killpg(self.proc.pid, signal.SIGKILL)
        kill_leftovers(self.owned)


class CachedVllm(PlainVllm):
    """`vllm serve` with our replicas' parser-table fix (serve_app.tools.bench.vllm_cached_server)."""

    name = "vllm-cached"

    @staticmethod
    def server_command(command: list[str]) -> list[str]:
        module = command.index(API_SERVER)
        return [*command[:module], CACHED_SERVER, *command[module + 1 :]]


class MultiVllm(PlainVllm):
    """`vllm serve --api-server-count N`, N the model's frontend count: as many frontend
    processes on one engine as our replica runs, so that the two compare like for like."""

    name = "vllm-multi"

    def __init__(self, model: ModelConfig, port: int, log_path: Path, timeout_s: float) -> None:
        self.api_servers = model.frontend_count
        super().__init__(model, port, log_path, timeout_s)

    @property
    def label(self) -> str:
        """`vllm-multi N=2`: the count of API server processes with the name."""
        return f"{self.name} N={self.api_servers}"

    def serve_args(self, model: ModelConfig, port: int) -> list[str]:
        return vllm_multi_serve_args(model, port, self.api_servers)

    def environment(self) -> dict[str, str]:
        """Without an inherited PROMETHEUS_MULTIPROC_DIR: with N > 1, vLLM makes a fresh one
        and removes it at exit; one left from another run would mix its metrics in."""
        env = super().environment()
        if self.api_servers > 1:
            env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        return env


class OurApp:
    """This app on a private local Ray instance (serve_app.local.launcher), serving one model."""

    name = label = "ours"

    def __init__(self, config: AppConfig, port: int, timeout_s: float, front: str = DEFAULT_FRONT) -> None:
        self.config, self.timeout_s = config, timeout_s
        self.local = LocalServe(port=port, front=front, dashboard=False)

    def start(self) -> str:
        from serve_app.serving.builder import build_openai_app

        deadline = time.monotonic() + self.timeout_s
        app = build_openai_app(self.config)
        self.local.start()
        why: str | None
        try:
            self.local.deploy(app, APP, timeout_s=self.timeout_s)
        except TimeoutError:
            why = f"the app did not start within the start timeout ({self.timeout_s:.0f} s)"
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            why = f"the app failed to start: {first[:300]}"
        else:
            why = wait_healthy(self.local.url, deadline, lambda: None, self.snapshot)
            if why is None:
                return self.local.url
        raise BenchError(f"ours: {why}{self._log_tail()}")

    def _log_tail(self) -> str:
        """The end of the Serve controller's log, where deployment failures are told."""
        session = self.local.session_dir
        if session is None:
            return ""
        logs = session / "logs"
        found = sorted((logs / "serve").glob("controller_*.log"), key=lambda p: p.stat().st_mtime)
        if not found:
            return f" (Ray's logs: {logs})"
        return f"; last {LOG_TAIL_LINES} lines of {found[-1]}:\n{tail(found[-1])}"

    def snapshot(self) -> None:
        self.local.snapshot()

    def stop(self) -> None:
        self.local.stop()
