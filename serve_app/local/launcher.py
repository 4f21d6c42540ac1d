"""One private local Ray and Serve, started and stopped by this process.

`serve_app run`, the benchmark, the soak and the test fixtures all run the app through
`LocalServe`. It always starts a new Ray instance (`address="local"`): it never attaches to a
cluster that runs on the same machine (`ray start --head`, `RAY_ADDRESS`), so stopping it
never shuts down Serve, or anything else, on a cluster it did not start. To deploy to a
cluster, use `serve deploy` (README.md).

What it starts, it stops: Serve, Ray, every replica and engine process below this one. A
sidecar (serve_app.serving.reaper) stops what Ray's own shutdown would miss if this process
is killed outright (HAProxy, which a Ray worker starts with the `haproxy` front).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from serve_app.local.front import DEFAULT_FRONT, front_variables
from serve_app.local.processes import descendants, stop_local_ray
from serve_app.serving.reaper import start_reaper

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def progress_line(status: Any, app_name: str) -> str:
    """One line on an application's deployments from `serve.status()`."""
    app = status.applications.get(app_name)
    if app is None:
        return "waiting for the Serve controller"
    parts = []
    for name, dep in app.deployments.items():
        running = dep.replica_states.get("RUNNING", 0)
        total = sum(dep.replica_states.values())
        parts.append(f"{name}: {running}/{total} replicas ready")
    return f"[{app.status}] " + "; ".join(parts)


@contextmanager
def _environment(variables: Mapping[str, str]) -> Iterator[None]:
    """`variables` set in this process's environment (which Ray's processes inherit), then
    restored."""
    before = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class LocalServe:
    """A private local Ray instance with Serve's HTTP on `host:port`; a context manager."""

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = LOOPBACK,
        front: str = DEFAULT_FRONT,
        dashboard: bool = True,
        dashboard_port: int | None = None,
        verbose: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port()
        self.front = front
        self.dashboard = dashboard
        self.dashboard_port = dashboard_port
        self.verbose = verbose
        self.env = dict(env or {})
        self.dashboard_url: str | None = None
        self.session_dir: Path | None = None
        self.owned: set[int] = set()  # every process seen below this one while the app ran
        self._reaper: Any = None
        self._stack = ExitStack()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> LocalServe:
        """Start Ray (a new local instance) and Serve's HTTP proxy."""
        import ray
        from ray import serve

        # The front's variables (an operator's own setting wins) and the caller's, read by Ray's
        # processes as they start; this process's environment is restored when Ray stops.
        self._stack.enter_context(_environment({**front_variables(self.front), **self.env}))
        # If this process is killed outright, Ray's own processes go with it, but not what
        # Ray's workers started (HAProxy, which would keep the port); the sidecar stops those.
        self._reaper = start_reaper()
        options: dict[str, Any] = {}
        if self.dashboard:
            options.update(dashboard_host=LOOPBACK, dashboard_port=self.dashboard_port)
        context = ray.init(
            address="local",
            _node_ip_address=LOOPBACK,
            include_dashboard=self.dashboard,
            log_to_driver=self.verbose,
            logging_level="INFO" if self.verbose else "WARNING",
            configure_logging=not self.verbose,
            **options,
        )
        if self.dashboard and context.dashboard_url:
            self.dashboard_url = f"http://{context.dashboard_url}"
        self.session_dir = Path(context.address_info["session_dir"])
        serve.start(http_options={"host": self.host, "port": self.port})
        self.snapshot()
        return self

    def snapshot(self) -> None:
        """Note the processes below this one now (engine processes are re-parented if their
        worker dies first, so they are collected while the app runs)."""
        self.owned |= descendants()

    def deploy(
        self,
        app: Any,
        name: str,
        route_prefix: str = "/",
        *,
        timeout_s: float | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        """`serve.run` the application and wait until it is running; `progress` is told each
        change of its deployments' replica counts. TimeoutError after `timeout_s`."""
        from ray import serve

        errors: list[BaseException] = []

        def run() -> None:
            try:
                serve.run(app, name=name, route_prefix=route_prefix)
            except BaseException as exc:  # reported by the caller's thread
                errors.append(exc)

        deployer = threading.Thread(target=run, daemon=True)
        deployer.start()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last = ""
        while deployer.is_alive():
            self.snapshot()
            deployer.join(timeout=2.0)
            if progress is not None and (line := progress_line(serve.status(), name)) != last:
                progress(line)
                last = line
            if deadline is not None and time.monotonic() > deadline and deployer.is_alive():
                raise TimeoutError(f"the application did not start within {timeout_s:.0f} s")
        if errors:
            raise errors[0]
        self.snapshot()

    def stop(self) -> int:
        """Stop Serve, Ray and everything they started; how many processes had to be killed."""
        reaper, self._reaper = self._reaper, None
        try:
            return stop_local_ray(self.owned, keep=frozenset({reaper.pid}) if reaper else frozenset())
        finally:
            if reaper is not None:
                reaper.terminate()
                reaper.wait()
            self._stack.close()

    def __enter__(self) -> LocalServe:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
