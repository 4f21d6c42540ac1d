"""Command line: run a Serve config on a local Ray instance, or write the demo models.

    python -m serve_app run [CONFIG]        # default: configs/local.yaml
    python -m serve_app check CONFIG        # validate a config and build the app, start nothing
    python -m serve_app models [DIR]        # write the demo models and their LoRA adapters (default: ./models)
    python -m serve_app batch submit FILE --wait   # an offline batch through the app (serve_app.local.batch)

`run` starts a private local Ray instance (serve_app.local.launcher: never a cluster that runs
on the machine already), deploys the application, shows progress while the engines load, prints
the URL and the Ray dashboard's (`--no-dashboard`: none), and on Ctrl-C (or SIGTERM) stops
everything it started. To deploy to a Ray cluster, use `serve deploy CONFIG` instead.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from serve_app.config import ConfigError, ServeFile, load_app_config, load_serve_file
from serve_app.guards.auth import check_exposure, hash_key
from serve_app.local.batch import add_batch_commands
from serve_app.local.front import HAPROXY_NOTE, add_front_option
from serve_app.local.launcher import LocalServe
from serve_app.local.ray_token import token_hint

DEFAULT_CONFIG = Path("configs/local.yaml")


def _load(path: Path) -> tuple[ServeFile, Any]:
    serve_file = load_serve_file(path)
    index_source = f"{path} (application '{serve_file.app_name}' args)"
    config = load_app_config(serve_file.args, source=index_source)
    return serve_file, config


def _build(config: Any) -> Any:
    from serve_app.serving.builder import build_openai_app

    return build_openai_app(config)


def cmd_check(args: argparse.Namespace) -> int:
    serve_file, config = _load(args.config)
    check_exposure(serve_file.http_host, config.auth, f"{args.config}: http_options.host")
    print(f"{args.config}: {len(config.models)} model(s): " + ", ".join(m.id for m in config.models))
    print("Checking engine arguments with vLLM...", flush=True)
    _build(config)
    print(f"{args.config}: OK")
    return 0


class _Stop(Exception):
    pass


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def cmd_run(args: argparse.Namespace) -> int:
    serve_file, config = _load(args.config)
    host = args.host or serve_file.http_host
    port = args.port or serve_file.http_port
    check_exposure(host, config.auth, f"{args.config}: http_options.host")
    print(
        f"mistral-serve: {len(config.models)} model(s) from {args.config}: "
        + ", ".join(m.id for m in config.models)
    )
    print("Checking engine arguments with vLLM...", flush=True)
    app = _build(config)

    # Ctrl-C stops the app, as it says, even when a launcher started us with SIGINT ignored
    # (a shell's background job, some CI runners): Python keeps an ignored SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_stop)
    started = time.monotonic()
    local = LocalServe(host=host, port=port, front=args.front, dashboard=args.dashboard, verbose=args.verbose)
    try:
        print(f"Starting a private local Ray instance ({args.front} front)...", flush=True)
        if args.front == "haproxy":
            print(f"note: {HAPROXY_NOTE}", flush=True)
        local.start()
        print("Loading engines (the first start compiles kernels; a minute or two on a small CPU)...")
        local.deploy(
            app,
            serve_file.app_name,
            serve_file.route_prefix,
            progress=lambda line: print(f"  {time.monotonic() - started:5.0f}s  {line}", flush=True),
        )
        _print_ready(local, serve_file, config.models[0].id, time.monotonic() - started)
        while True:
            time.sleep(5.0)
            local.snapshot()
    except (KeyboardInterrupt, _Stop):
        print("\nStopping...", flush=True)
    finally:
        left = local.stop()
        if left:
            print(f"Stopped {left} process(es) that outlived Ray's shutdown.")
        print("Stopped.", flush=True)
    return 0


def _print_ready(local: LocalServe, serve_file: ServeFile, model: str, took_s: float) -> None:
    url = local.url + serve_file.route_prefix.rstrip("/")
    print(f"\nReady in {took_s:.0f}s. Serving on {url}")
    print(f"  curl {url}/v1/models")
    print(
        f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
        f'-d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}]}}\''
    )
    if local.dashboard_url:
        print(f"Ray dashboard: {local.dashboard_url} ({token_hint()})")
    print("Press Ctrl-C to stop.", flush=True)


def cmd_hash_key(args: argparse.Namespace) -> int:
    key = args.key if args.key != "-" else sys.stdin.readline().strip()
    print(hash_key(key))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from serve_app.models.adapters import main as write_adapters
    from serve_app.models.demo import main as write_models

    return write_models([str(args.out_dir)]) or write_adapters([str(args.out_dir)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mistral-serve", description="Serve Mistral models on Ray Serve + vLLM."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a Serve config on a private local Ray instance")
    run.add_argument("config", nargs="?", type=Path, default=DEFAULT_CONFIG)
    run.add_argument("--host", help="override http_options.host")
    run.add_argument("--port", type=int, help="override http_options.port")
    run.add_argument(
        "--dashboard",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start the Ray dashboard on loopback and print its URL (default: on)",
    )
    add_front_option(run)
    run.add_argument("--verbose", action="store_true", help="show Ray and vLLM logs")
    run.set_defaults(func=cmd_run)
    check = sub.add_parser("check", help="validate a Serve config and build its application")
    check.add_argument("config", type=Path)
    check.set_defaults(func=cmd_check)
    hashed = sub.add_parser("hash-key", help="print the sha256:<hex> form of an API key for auth.api_keys")
    hashed.add_argument("key", help="the key, or - to read it from standard input")
    hashed.set_defaults(func=cmd_hash_key)
    models = sub.add_parser("models", help="write the demo models")
    models.add_argument("out_dir", nargs="?", type=Path, default=Path("models"))
    models.set_defaults(func=cmd_models)
    add_batch_commands(sub)
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
