"""Offline batches from the command line, through the app's Batch API.

    python -m serve_app batch submit FILE [--endpoint /v1/chat/completions] [--wait]
        [--output OUT] [--errors ERR] [--metadata KEY=VALUE ...]
    python -m serve_app batch status BATCH_ID [--wait] [--output OUT] [--errors ERR]
    python -m serve_app batch cancel BATCH_ID
    python -m serve_app batch list

`batch --url URL <command> ...` names the app (default http://127.0.0.1:8000: `--url` goes
before the command); every command reads the API key from the
variable `--api-key-env` names (default MISTRAL_SERVE_API_KEY; none for a keyless app).
FILE is OpenAI's batch input: one `{"custom_id", "method", "url", "body"}` per line; the
endpoint defaults to the first line's `url`. `--wait` shows a progress bar (answered lines,
failed ones, output tokens/s, time to go) and writes the output and error files when the
batch ends (default: FILE's name with `.output.jsonl` and `.errors.jsonl`). Ctrl-C stops
waiting, not the batch: `status --wait` picks it up again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
FINAL = ("completed", "failed", "expired", "cancelled")


class BatchCliError(Exception):
    """An answer the command cannot go on from: its message is for the user."""


class BatchClient:
    """The Batch API's calls, over one HTTP connection pool."""

    def __init__(self, url: str, api_key: str | None, timeout_s: float = 300.0) -> None:
        # The header always goes: a keyless app takes uploads only with one (serve_app.guards.origin).
        headers = {"Authorization": f"Bearer {api_key or 'none'}"}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def _json(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:500]
            raise BatchCliError(f"{response.status_code}: {message}")
        return response.json()

    def upload(self, path: Path) -> dict[str, Any]:
        with path.open("rb") as f:
            files = {"file": (path.name, f, "application/jsonl")}
            return self._json(self._http.post("/v1/files", files=files, data={"purpose": "batch"}))

    def create(self, file_id: str, endpoint: str, metadata: dict[str, str] | None) -> dict[str, Any]:
        body = {
            "input_file_id": file_id,
            "endpoint": endpoint,
            "completion_window": "24h",
            "metadata": metadata,
        }
        return self._json(self._http.post("/v1/batches", json=body))

    def get(self, batch_id: str) -> dict[str, Any]:
        return self._json(self._http.get(f"/v1/batches/{batch_id}"))

    def cancel(self, batch_id: str) -> dict[str, Any]:
        return self._json(self._http.post(f"/v1/batches/{batch_id}/cancel"))

    def list(self) -> list[dict[str, Any]]:
        return self._json(self._http.get("/v1/batches", params={"limit": 100}))["data"]

    def download(self, file_id: str, out: Path) -> int:
        """Write a file's content to `out`; its number of lines."""
        response = self._http.get(f"/v1/files/{file_id}/content")
        if response.status_code >= 400:
            self._json(response)
        out.write_bytes(response.content)
        return response.content.count(b"\n")


def first_endpoint(path: Path) -> str:
    """The `url` of the file's first request."""
    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    url = json.loads(raw).get("url")
                except (ValueError, AttributeError):
                    raise BatchCliError(f"{path}: the first line is not a JSON object") from None
                if not isinstance(url, str):
                    raise BatchCliError(f"{path}: the first line has no 'url'; give --endpoint")
                return url
    raise BatchCliError(f"{path}: the file holds no requests")


class Progress:
    """A progress bar of a batch's answered lines, on standard error."""

    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, unit="line", dynamic_ncols=True, file=sys.stderr)
        self._start = time.monotonic()
        self._tokens0: int | None = None

    def update(self, batch: dict[str, Any]) -> None:
        counts = batch["request_counts"]
        tokens = int((batch.get("usage") or {}).get("output_tokens") or 0)
        if self._tokens0 is None:
            self._tokens0 = tokens
        rate = (tokens - self._tokens0) / max(time.monotonic() - self._start, 1e-6)
        self._bar.total = counts["total"]
        self._bar.n = counts["completed"] + counts["failed"]
        self._bar.set_postfix(
            failed=counts["failed"], tok_s=f"{rate:.0f}", status=batch["status"], refresh=False
        )
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


def wait(client: BatchClient, batch_id: str, interval_s: float, show: bool) -> dict[str, Any]:
    batch = client.get(batch_id)
    bar = Progress(batch["request_counts"]["total"]) if show else None
    try:
        while True:
            if bar is not None:
                bar.update(batch)
            if batch["status"] in FINAL:
                return batch
            time.sleep(interval_s)
            batch = client.get(batch_id)
    finally:
        if bar is not None:
            bar.close()


def save_results(client: BatchClient, batch: dict[str, Any], output: Path, errors: Path) -> None:
    counts = batch["request_counts"]
    print(
        f"batch {batch['id']} {batch['status']}: {counts['completed']} completed, "
        f"{counts['failed']} failed of {counts['total']}"
    )
    for file_id, path, what in (
        (batch.get("output_file_id"), output, "outputs"),
        (batch.get("error_file_id"), errors, "errors"),
    ):
        if file_id:
            print(f"  {what}: {path} ({client.download(file_id, path)} lines)")


def _outputs(args: argparse.Namespace, stem: Path) -> tuple[Path, Path]:
    base = stem.with_suffix("") if stem.suffix == ".jsonl" else stem
    output = args.output or base.with_name(base.name + ".output.jsonl")
    errors = args.errors or base.with_name(base.name + ".errors.jsonl")
    return output, errors


def _metadata(pairs: list[str]) -> dict[str, str] | None:
    if not pairs:
        return None
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise BatchCliError(f"--metadata takes KEY=VALUE, not {pair!r}")
        out[key] = value
    return out


def cmd_submit(client: BatchClient, args: argparse.Namespace) -> int:
    path: Path = args.file
    if not path.is_file():
        raise BatchCliError(f"{path}: no such file")
    endpoint = args.endpoint or first_endpoint(path)
    print(f"Uploading {path} ({path.stat().st_size} bytes)...", file=sys.stderr, flush=True)
    uploaded = client.upload(path)
    batch = client.create(uploaded["id"], endpoint, _metadata(args.metadata))
    print(batch["id"], flush=True)
    if not args.wait:
        return 0
    return _wait_and_save(client, batch["id"], args, path)


def _wait_and_save(client: BatchClient, batch_id: str, args: argparse.Namespace, stem: Path) -> int:
    try:
        batch = wait(client, batch_id, args.interval, show=not args.quiet)
    except KeyboardInterrupt:
        print(
            f"\nStopped waiting; the batch goes on. `batch status {batch_id} --wait` to wait again, "
            f"`batch cancel {batch_id}` to stop it.",
            file=sys.stderr,
        )
        return 130
    save_results(client, batch, *_outputs(args, stem))
    return 0 if batch["status"] == "completed" else 1


def cmd_status(client: BatchClient, args: argparse.Namespace) -> int:
    if args.wait:
        return _wait_and_save(client, args.batch_id, args, Path(args.batch_id))
    print(json.dumps(client.get(args.batch_id), indent=2))
    return 0


def cmd_cancel(client: BatchClient, args: argparse.Namespace) -> int:
    batch = client.cancel(args.batch_id)
    print(f"batch {batch['id']}: {batch['status']}")
    return 0


def cmd_list(client: BatchClient, _args: argparse.Namespace) -> int:
    for batch in client.list():
        counts = batch["request_counts"]
        done = counts["completed"] + counts["failed"]
        print(f"{batch['id']}  {batch['status']:<11}  {done}/{counts['total']}  {batch['endpoint']}")
    return 0


def add_batch_commands(sub: Any) -> None:
    """The `batch` command and its subcommands, on the main command line's subparsers."""
    batch = sub.add_parser("batch", help="offline batches through the app's Batch API")
    batch.add_argument("--url", default=DEFAULT_URL, help=f"the app's URL (default {DEFAULT_URL})")
    batch.add_argument(
        "--api-key-env",
        default="MISTRAL_SERVE_API_KEY",
        help="the variable holding the API key, if the app has keys",
    )
    commands = batch.add_subparsers(dest="batch_command", required=True)
    submit = commands.add_parser("submit", help="upload a JSONL file of requests and start a batch")
    submit.add_argument("file", type=Path)
    submit.add_argument("--endpoint", help="the batch's endpoint (default: the first line's url)")
    submit.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    status = commands.add_parser("status", help="show a batch (--wait: wait for it and save its files)")
    status.add_argument("batch_id")
    for command in (submit, status):
        command.add_argument("--wait", action="store_true", help="wait for the end, with a progress bar")
        command.add_argument("--output", type=Path, help="where the outputs go (with --wait)")
        command.add_argument("--errors", type=Path, help="where the error lines go (with --wait)")
        command.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
        command.add_argument("--quiet", action="store_true", help="no progress bar")
    submit.set_defaults(batch_func=cmd_submit)
    status.set_defaults(batch_func=cmd_status)
    cancel = commands.add_parser("cancel", help="cancel a batch: what is answered is kept")
    cancel.add_argument("batch_id")
    cancel.set_defaults(batch_func=cmd_cancel)
    listed = commands.add_parser("list", help="the key's batches, newest first")
    listed.set_defaults(batch_func=cmd_list)
    batch.set_defaults(func=run_batch_command)


def run_batch_command(args: argparse.Namespace) -> int:
    client = BatchClient(args.url, os.environ.get(args.api_key_env))
    try:
        return int(args.batch_func(client, args))
    except BatchCliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
