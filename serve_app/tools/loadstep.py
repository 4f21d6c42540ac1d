"""Run a load step against one model and plot offered load, replicas and latency to a PNG.

    python -m serve_app.tools.loadstep --url http://127.0.0.1:8000 --model MODEL \\
        --before 1 --after 12 --step-at 10 --duration 60 --out load-step.png

Clients stream chat completions back to back: `--before` of them until `--step-at` seconds,
`--after` of them from then on, all stopping at `--duration`. Meanwhile the script reads
the model deployment's replicas from the Ray dashboard's REST API (`--dashboard`), so it
works against any cluster whose dashboard it can reach. Load generation runs in this
process; on a small machine it shares cores with the servers.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from serve_app.local.ray_token import auth_headers
from serve_app.tools.load import LoadThread, chat_call


@dataclass
class RequestSample:
    start: float
    ttft_s: float | None
    latency_s: float
    ok: bool


@dataclass
class ReplicaSample:
    t: float
    running: int
    target: int


@dataclass
class LoadStepResult:
    model: str
    deployment: str
    step_at_s: float
    clients: list[tuple[float, int]] = field(default_factory=list)  # (t, concurrent clients)
    requests: list[RequestSample] = field(default_factory=list)
    replicas: list[ReplicaSample] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        ok = [r for r in self.requests if r.ok]
        after = [r.t for r in self.replicas if r.t >= self.step_at_s]
        first_up = next(
            (r.t for r in self.replicas if r.t >= self.step_at_s and r.target > self._before()), None
        )
        first_ready = next(
            (r.t for r in self.replicas if r.t >= self.step_at_s and r.running > self._before()), None
        )
        return {
            "requests": len(self.requests),
            "failed": len(self.requests) - len(ok),
            "replicas_before": self._before(),
            "replicas_peak": max((r.running for r in self.replicas), default=0),
            "step_to_scale_up_decision_s": None if first_up is None else round(first_up - self.step_at_s, 2),
            "step_to_new_replica_ready_s": None
            if first_ready is None
            else round(first_ready - self.step_at_s, 2),
            "samples_after_step": len(after),
        }

    def _before(self) -> int:
        before = [r.running for r in self.replicas if r.t < self.step_at_s]
        return before[-1] if before else 0


def deployment_replicas(dashboard: str, deployment: str, client: httpx.Client) -> tuple[int, int]:
    """(running, target) replicas of a deployment, from the dashboard's Serve REST API."""
    data = client.get(f"{dashboard}/api/serve/applications/", timeout=5).json()
    for app in (data.get("applications") or {}).values():
        dep = (app.get("deployments") or {}).get(deployment)
        if dep is not None:
            running = sum(1 for r in dep.get("replicas", []) if r.get("state") == "RUNNING")
            return running, int(dep.get("target_num_replicas", running))
    raise KeyError(f"no deployment named {deployment!r} on {dashboard}")


def run_load_step(
    *,
    url: str,
    model: str,
    deployment: str,
    dashboard: str,
    before: int,
    after: int,
    step_at_s: float,
    duration_s: float,
    max_tokens: int = 64,
    progress: Callable[[str], None] = lambda _: None,
) -> LoadStepResult:
    """`before` clients stream back to back until `step_at_s`, `after` from then on, until
    `duration_s`; the deployment's replicas are read every half second meanwhile."""
    result = LoadStepResult(model=model, deployment=deployment, step_at_s=step_at_s)
    call = chat_call(model, "Tell me a story.", max_tokens)
    starts = [0.0] * before + [step_at_s] * (after - before)
    t0 = time.monotonic()  # the clients' times count from their start, within milliseconds
    load = LoadThread(url, lambda: call, after, starts_s=starts, duration_s=duration_s).start()
    stop = threading.Event()

    def sample_replicas() -> None:
        with httpx.Client(headers=auth_headers()) as client:
            while not stop.is_set():
                try:
                    running, target = deployment_replicas(dashboard, deployment, client)
                    result.replicas.append(ReplicaSample(time.monotonic() - t0, running, target))
                except (httpx.HTTPError, KeyError, ValueError):
                    pass
                stop.wait(0.5)

    sampler = threading.Thread(target=sample_replicas, daemon=True)
    sampler.start()
    result.clients = [(0.0, before), (step_at_s, before), (step_at_s, after), (duration_s, after)]
    while (elapsed := time.monotonic() - t0) < duration_s:
        time.sleep(min(5.0, duration_s - elapsed))
        last = result.replicas[-1] if result.replicas else None
        progress(
            f"{elapsed:5.0f}s  clients {before if elapsed < step_at_s else after}"
            f"  replicas {last.running if last else '?'}/{last.target if last else '?'}"
            f"  requests {len(load.results)}"
        )
    finished = load.join(timeout_s=660)
    stop.set()
    sampler.join(timeout=10)
    result.requests = [
        RequestSample(r.start_s, r.ttft_s, r.latency_s, r.done and r.error is None) for r in finished
    ]
    return result


def plot(result: LoadStepResult, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_load, ax_rep, ax_lat) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    xs, ys = zip(*result.clients, strict=True)
    ax_load.step(xs, ys, where="post", color="tab:blue")
    ax_load.set_ylabel("concurrent\nstreams")
    ax_load.set_title(f"Load step on {result.model}")
    ax_rep.step(
        [r.t for r in result.replicas],
        [r.target for r in result.replicas],
        where="post",
        label="target",
        color="tab:orange",
    )
    ax_rep.step(
        [r.t for r in result.replicas],
        [r.running for r in result.replicas],
        where="post",
        label="running",
        color="tab:green",
    )
    ax_rep.set_ylabel("replicas")
    ax_rep.legend(loc="upper left")
    done = sorted((r for r in result.requests if r.ok), key=lambda r: r.start)
    ax_lat.scatter(
        [r.start for r in done], [r.latency_s for r in done], s=6, label="request latency", color="tab:purple"
    )
    ax_lat.scatter(
        [r.start for r in done if r.ttft_s is not None],
        [r.ttft_s for r in done if r.ttft_s is not None],
        s=6,
        label="time to first token",
        color="tab:red",
    )
    failed = [r for r in result.requests if not r.ok]
    if failed:
        ax_lat.scatter(
            [r.start for r in failed], [0] * len(failed), marker="x", color="black", label="failed"
        )
    ax_lat.set_ylabel("seconds")
    ax_lat.set_xlabel("seconds since start (request start time)")
    ax_lat.legend(loc="upper left")
    for ax in (ax_load, ax_rep, ax_lat):
        ax.axvline(result.step_at_s, color="grey", linestyle=":")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", required=True, help="the model id clients send")
    parser.add_argument("--deployment", help="its Serve deployment (default: derived from the id)")
    parser.add_argument("--dashboard", default="http://127.0.0.1:8265", help="Ray dashboard URL")
    parser.add_argument("--before", type=int, default=1, help="streams before the step")
    parser.add_argument("--after", type=int, default=12, help="streams after the step")
    parser.add_argument("--step-at", type=float, default=10.0, help="seconds before the step")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds in all")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("load-step.png"))
    args = parser.parse_args(argv)
    if args.after < args.before:
        parser.error("--after must be at least --before")
    from serve_app.config import ModelConfig

    deployment = args.deployment or ModelConfig(id=args.model, source="-").deployment_name
    result = run_load_step(
        url=args.url.rstrip("/"),
        model=args.model,
        deployment=deployment,
        dashboard=args.dashboard.rstrip("/"),
        before=args.before,
        after=args.after,
        step_at_s=args.step_at,
        duration_s=args.duration,
        max_tokens=args.max_tokens,
        progress=lambda line: print(line, flush=True),
    )
    plot(result, args.out)
    args.out.with_suffix(".json").write_text(json.dumps({**asdict(result), "summary": result.summary()}))
    print(json.dumps(result.summary()))
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
