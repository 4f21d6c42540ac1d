"""The Batch API in this process (fake engine): files and batches through OpenAI's own client,
what a bad file gets, each key's own objects, and a batch that resumes after its service stops."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from serve_app.engine.protocol import Route
from serve_app.errors import ApiError
from serve_app.guards.auth import hash_key
from serve_app.local.cli import main
from serve_app.serving.batches import runner
from serve_app.serving.batches.format import LineAnswer, parse_lines
from serve_app.serving.batches.service import BatchService
from serve_app.serving.lanes import MAX_PREEMPTIONS, Lane
from tests.support.inprocess import (
    InProcessApp,
    chat,
    config,
    fake,
    in_process_app,
    over_http,
    run,
    start_batch_service,
)

CHAT = "/v1/chat/completions"


def line(i: int, model: str = "small", url: str = CHAT, **body: Any) -> dict[str, Any]:
    return {"custom_id": f"req-{i}", "method": "POST", "url": url, "body": chat(model, **body)}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


def cfg(tmp_path: Path, *models: dict[str, Any], **app: Any) -> Any:
    batches = {"store": str(tmp_path / "store"), **app.pop("batches", {})}
    return config(*(models or (fake("small", aliases=["tiny"]),)), batches=batches, **app)


def client(app: InProcessApp, key: str = "any") -> openai.AsyncOpenAI:
    http = app.client()
    return openai.AsyncOpenAI(base_url="http://localhost/v1", api_key=key, http_client=http, max_retries=0)


async def finished(oai: openai.AsyncOpenAI, batch_id: str, timeout_s: float = 30) -> Any:
    for _ in range(int(timeout_s / 0.05)):
        batch = await oai.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        await asyncio.sleep(0.05)
    raise AssertionError(f"batch {batch_id} still {batch.status}")


def with_app(config_: Any, scenario: Any) -> None:
    async def go() -> None:
        app = await in_process_app(config_, batches=True)
        try:
            await scenario(app)
        finally:
            await app.close()

    run(go)


def records(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(x) for x in data.decode().splitlines()]


# --- a batch end to end ---------------------------------------------------------------------------


def test_a_batch_through_openais_client_answers_every_line_as_the_api_would_one_by_one(
    tmp_path: Path,
) -> None:
    requests = [line(i, "small" if i % 2 else "tiny", max_tokens=2 + i % 4) for i in range(40)]
    requests[7]["body"]["n"] = 99  # over the bound on `n`: that line's own 400

    async def scenario(app: InProcessApp) -> None:
        oai = client(app)
        uploaded = await oai.files.create(file=("in.jsonl", jsonl(requests)), purpose="batch")
        assert uploaded.purpose == "batch" and uploaded.bytes == len(jsonl(requests))
        batch = await oai.batches.create(
            input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h", metadata={"team": "a"}
        )
        assert batch.status in ("validating", "in_progress") and batch.request_counts.total == 40
        batch = await finished(oai, batch.id)
        assert batch.status == "completed" and batch.metadata == {"team": "a"}
        assert (batch.request_counts.completed, batch.request_counts.failed) == (39, 1)
        out = records((await oai.files.content(batch.output_file_id)).read())
        err = records((await oai.files.content(batch.error_file_id)).read())
        assert [r["custom_id"] for r in out] == [f"req-{i}" for i in range(40) if i != 7]
        assert [r["custom_id"] for r in err] == ["req-7"]
        assert err[0]["response"]["status_code"] == 400 and "n" in err[0]["error"]["message"]
        async with app.client() as http:
            for record, request in zip(
                out[:6], [r for r in requests if r["custom_id"] != "req-7"], strict=False
            ):
                alone = (await http.post(CHAT, json=request["body"])).json()
                assert record["response"]["status_code"] == 200
                assert record["response"]["body"]["choices"] == alone["choices"]
        assert batch.usage is not None and batch.usage.output_tokens == sum(
            r["response"]["body"]["usage"]["completion_tokens"] for r in out
        )
        listed = await oai.batches.list()
        assert [b.id for b in listed.data] == [batch.id]
        files = {f.id: f.purpose for f in (await oai.files.list()).data}
        assert files == {
            uploaded.id: "batch",
            batch.output_file_id: "batch_output",
            batch.error_file_id: "batch_output",
        }

    with_app(cfg(tmp_path), scenario)


def test_batch_requests_reach_the_replica_as_batch_requests_at_the_batch_priority(tmp_path: Path) -> None:
    model = fake("small", engine_args={"scheduling_policy": "priority"})

    async def scenario(app: InProcessApp) -> None:
        oai = client(app)
        uploaded = await oai.files.create(file=("in.jsonl", jsonl([line(0)])), purpose="batch")
        batch = await oai.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
        assert (await finished(oai, batch.id)).status == "completed"
        (handle,) = app.handles.values()
        assert handle.keywords[-1]["batch"] is True
        assert json.loads(handle.calls[-1][1])["priority"] == 7

    with_app(cfg(tmp_path, model, batches={"priority": 7}), scenario)


# --- bad files and bad batches -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"custom_id": "a"\n', "Line 1 of the file: The request body is not valid JSON"),
        (jsonl([line(0)]) + b"[1, 2]\n", "Line 2 of the file: not a JSON object"),
        (jsonl([line(0), line(0)]), "Line 2 of the file: 'custom_id' repeats"),
        (jsonl([line(0, url="/v1/embeddings")]), "'url' '/v1/embeddings' is not served in batches"),
        (jsonl([{**line(0), "method": "GET"}]), "'method' must be \"POST\""),
        (jsonl([line(0, stream=True)]), "'body.stream' cannot be true"),
        (jsonl([{**line(0), "body": {"messages": []}}]), "'body.model' must be a model's name"),
        (
            b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"model": "m", "x": NaN}}',
            "NaN",
        ),
        (b"\n\n", "The file holds no requests"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_a_file_that_is_not_a_batch_input_is_refused_naming_its_first_bad_line(
    content: bytes, expected: str
) -> None:
    with pytest.raises(ApiError) as caught:
        parse_lines(content, max_lines=10, max_body_bytes=10_000)
    assert caught.value.status == 400 and expected in caught.value.message


def test_upload_and_create_refuse_what_cannot_run_with_clear_errors(tmp_path: Path) -> None:
    async def scenario(app: InProcessApp) -> None:
        oai = client(app)
        with pytest.raises(openai.BadRequestError, match="Line 1 of the file"):
            await oai.files.create(file=("x.jsonl", b"not json\n"), purpose="batch")
        with pytest.raises(openai.BadRequestError, match="more than 3 requests"):
            await oai.files.create(file=("x.jsonl", jsonl([line(i) for i in range(4)])), purpose="batch")
        with pytest.raises(openai.APIStatusError, match="limit") as big:
            await oai.files.create(file=("x.jsonl", b"x" * 5000), purpose="batch")
        assert big.value.status_code == 413
        with pytest.raises(openai.BadRequestError, match="purpose"):
            await oai.files.create(file=("x.jsonl", jsonl([line(0)])), purpose="fine-tune")
        unknown = await oai.files.create(file=("x.jsonl", jsonl([line(0, "nope")])), purpose="batch")
        with pytest.raises(openai.BadRequestError, match="`nope`, which is not served"):
            await oai.batches.create(input_file_id=unknown.id, endpoint=CHAT, completion_window="24h")
        good = await oai.files.create(file=("x.jsonl", jsonl([line(0)])), purpose="batch")
        with pytest.raises(openai.BadRequestError, match="every line's 'url' must be the batch's endpoint"):
            await oai.batches.create(
                input_file_id=good.id, endpoint="/v1/completions", completion_window="24h"
            )
        with pytest.raises(openai.BadRequestError, match="endpoint"):
            await oai.batches.create(
                input_file_id=good.id, endpoint="/v1/embeddings", completion_window="24h"
            )  # type: ignore[arg-type]
        with pytest.raises(openai.BadRequestError, match="24h"):
            await oai.batches.create(input_file_id=good.id, endpoint=CHAT, completion_window="1h")  # type: ignore[arg-type]
        with pytest.raises(openai.NotFoundError):
            await oai.batches.create(input_file_id="file-nope", endpoint=CHAT, completion_window="24h")
        assert [b.id for b in (await oai.batches.list()).data] == []

    with_app(cfg(tmp_path, batches={"max_lines": 3, "max_file_bytes": 4000}), scenario)


# --- keys ----------------------------------------------------------------------------------------------


def test_a_key_sees_and_changes_only_its_own_files_and_batches(tmp_path: Path) -> None:
    keys = {"api_keys": [hash_key("alice"), hash_key("bob")]}

    async def scenario(app: InProcessApp) -> None:
        alice, bob = client(app, "alice"), client(app, "bob")
        uploaded = await alice.files.create(file=("a.jsonl", jsonl([line(0)])), purpose="batch")
        batch = await alice.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
        for call in (
            bob.files.retrieve(uploaded.id),
            bob.files.content(uploaded.id),
            bob.files.delete(uploaded.id),
            bob.batches.retrieve(batch.id),
            bob.batches.cancel(batch.id),
            bob.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h"),
        ):
            with pytest.raises(openai.NotFoundError):
                await call
        assert (await bob.files.list()).data == [] and (await bob.batches.list()).data == []
        with pytest.raises(openai.AuthenticationError):
            await client(app, "mallory").batches.list()
        assert (await finished(alice, batch.id)).request_counts.completed == 1

    with_app(cfg(tmp_path, auth=keys), scenario)


def test_a_keyless_app_takes_uploads_only_with_an_authorization_header_no_form_can_send(
    tmp_path: Path,
) -> None:
    async def scenario(app: InProcessApp) -> None:
        async with app.client() as http:
            files = {"file": ("x.jsonl", jsonl([line(0)]))}
            form = await http.post("/v1/files", files=files, data={"purpose": "batch"})
            assert form.status_code == 403 and "Authorization" in form.json()["error"]["message"]
            plain = await http.post(
                "/v1/files", content=jsonl([line(0)]), headers={"authorization": "Bearer x"}
            )
            assert plain.status_code == 415
            ok = await http.post(
                "/v1/files", files=files, data={"purpose": "batch"}, headers={"authorization": "Bearer x"}
            )
            assert ok.status_code == 200, ok.text

    with_app(cfg(tmp_path), scenario)


def test_the_batch_api_is_off_where_the_config_turns_it_off(tmp_path: Path) -> None:
    async def scenario(app: InProcessApp) -> None:
        async with app.client({"authorization": "Bearer x"}) as http:
            assert (await http.get("/v1/batches")).status_code == 404
            assert (await http.get("/v1/files")).status_code == 404

    async def go() -> None:
        app = await in_process_app(cfg(tmp_path, batches={"enabled": False}))
        try:
            await scenario(app)
        finally:
            await app.close()

    run(go)


# --- nothing lost ----------------------------------------------------------------------------------------


class Flaky:
    """A stand-in for the ingress: answers like the fake model, "not now" or a dead replica as
    told, and counts what it was sent."""

    def __init__(
        self, failures: list[Any] | None = None, hold: asyncio.Event | None = None, delay_s: float = 0.0
    ) -> None:
        self.failures = failures or []
        self.sent: list[str] = []
        self.hold = hold
        self.delay_s = delay_s

    async def __call__(self, owner: str, route: Route, body: bytes, request_id: str) -> LineAnswer:
        self.sent.append(request_id)
        if self.failures:
            failure = self.failures.pop(0)
            if isinstance(failure, BaseException):
                raise failure
            return LineAnswer(failure, b'{"error": {"message": "later"}}', request_id)
        await asyncio.sleep(self.delay_s)
        if self.hold is not None:
            await self.hold.wait()
        usage = {"prompt_tokens": 3, "completion_tokens": 2}
        return LineAnswer(
            200, json.dumps({"echo": json.loads(body), "usage": usage}).encode(), request_id, 3, 2
        )


async def until(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never came")


async def submit(service: BatchService, lines: list[dict[str, Any]], owner: str = "anonymous") -> str:
    uploaded = await service.create_file(owner, "in.jsonl", "batch", jsonl(lines))
    created = await service.create_batch(owner, uploaded["id"], CHAT, "24h", None, ["small"])
    return str(created["id"])


async def wait_status(
    service: BatchService, batch_id: str, done: tuple[str, ...] = runner.FINAL
) -> dict[str, Any]:
    for _ in range(400):
        batch = await service.get_batch("anonymous", batch_id)
        if batch["status"] in done:
            return batch
        await asyncio.sleep(0.05)
    raise AssertionError(batch)


def test_answers_that_say_not_now_are_sent_again_and_written_once(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(runner, "FIRST_RETRY_S", 0.01)
    flaky = Flaky([503, RuntimeError("ingress died"), 429])

    async def scenario() -> None:
        service = await start_batch_service(cfg(tmp_path), flaky)
        batch_id = await submit(service, [line(i) for i in range(5)])
        batch = await wait_status(service, batch_id)
        assert batch["request_counts"] == {"total": 5, "completed": 5, "failed": 0}
        out = records(await service.file_content("anonymous", batch["output_file_id"]))
        assert sorted(r["custom_id"] for r in out) == [f"req-{i}" for i in range(5)]
        assert len(flaky.sent) == 8 and len(set(flaky.sent)) == 8  # each attempt has its own id
        await service.stop()

    run(scenario)


def test_a_batch_resumes_after_its_service_stops_and_answers_each_line_exactly_once(tmp_path: Path) -> None:
    config_ = cfg(tmp_path, batches={"max_in_flight_per_model": 2})
    lines = [line(i) for i in range(30)]

    async def scenario() -> None:
        first = Flaky(delay_s=0.02)
        service = await start_batch_service(config_, first)
        batch_id = await submit(service, lines)
        await until(lambda: len(first.sent) >= 12)
        first.hold = asyncio.Event()  # what is in flight now never returns: the service dies
        await asyncio.sleep(runner.FLUSH_S + 0.2)  # what was answered is written
        await service.stop()
        answered_before = len(first.sent) - 2
        second = Flaky()
        resumed = await start_batch_service(config_, second)  # a new replica on the same store
        batch = await wait_status(resumed, batch_id)
        assert batch["status"] == "completed"
        assert batch["request_counts"] == {"total": 30, "completed": 30, "failed": 0}
        assert len(second.sent) == 30 - answered_before  # only what no part held
        out = records(await resumed.file_content("anonymous", batch["output_file_id"]))
        assert [r["custom_id"] for r in out] == [f"req-{i}" for i in range(30)]
        assert batch["usage"]["total_tokens"] == 30 * 5
        await resumed.stop()

    run(scenario)


@pytest.mark.parametrize(("total", "most"), [(None, 4), (1, 1), (3, 3)])
def test_batch_slots_bound_each_model_and_all_models_together(total: int | None, most: int) -> None:
    async def scenario() -> None:
        slots = runner.ModelSlots(per_model=2, total=total)
        now, seen = 0, 0

        async def request(model: str) -> None:
            nonlocal now, seen
            async with slots.hold(model):
                now += 1
                seen = max(seen, now)
                await asyncio.sleep(0.01)
                now -= 1

        await asyncio.gather(*(request(m) for m in ("small", "big") * 5))
        assert seen == most
        assert slots.running == {"small": 0, "big": 0}

    run(scenario)


def test_a_cancelled_batch_stops_sending_and_keeps_what_was_answered(tmp_path: Path) -> None:
    config_ = cfg(tmp_path, batches={"max_in_flight_per_model": 1})

    async def scenario() -> None:
        flaky = Flaky(hold=asyncio.Event())
        service = await start_batch_service(config_, flaky)
        batch_id = await submit(service, [line(i) for i in range(10)])
        await until(lambda: bool(flaky.sent))
        cancelling = await service.cancel_batch("anonymous", batch_id)
        assert cancelling["status"] == "cancelling"
        batch = await wait_status(service, batch_id)
        assert batch["status"] == "cancelled" and batch["cancelled_at"] is not None
        assert len(flaky.sent) == 1 and batch["output_file_id"] is None
        again = await service.cancel_batch("anonymous", batch_id)
        assert again.status == 400  # a Refusal: it is over
        await service.stop()

    run(scenario)


# --- interactive first -------------------------------------------------------------------------------------


def test_a_lane_holds_batch_requests_back_and_preempts_them_while_an_interactive_request_starts() -> None:
    async def scenario() -> None:
        lane = Lane()
        attempts: list[int] = []

        async def attempt(preempted: int) -> str:
            attempts.append(preempted)
            await asyncio.sleep(0.3)
            return f"done after {preempted}"

        batch = asyncio.ensure_future(lane.run_batch(attempt))
        await asyncio.sleep(0.05)
        hold = lane.hold()  # an interactive request arrives: the batch request is preempted
        await asyncio.sleep(0.05)
        assert attempts == [0] and not batch.done() and lane.starting == 1
        hold.release()  # its first token: the batch request goes again
        hold.release()  # once only
        assert await asyncio.wait_for(batch, 2) == "done after 1" and attempts == [0, 1]
        assert lane.starting == 0

        # Preempted MAX_PREEMPTIONS times, a batch request runs on.
        attempts.clear()
        batch = asyncio.ensure_future(lane.run_batch(attempt))
        for _ in range(MAX_PREEMPTIONS + 1):
            await asyncio.sleep(0.05)
            lane.hold().release()
        assert await asyncio.wait_for(batch, 2) == f"done after {MAX_PREEMPTIONS}"

        # Its caller's cancellation ends it.
        batch = asyncio.ensure_future(lane.run_batch(attempt))
        await asyncio.sleep(0.05)
        batch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await batch

    run(scenario)


def test_an_interactive_request_preempts_a_batch_request_in_the_engine_and_starts_as_if_alone(
    tmp_path: Path,
) -> None:
    model = fake("small", engine_args={"ttft_s": 0.05, "tokens_per_s": 20.0})

    async def scenario(app: InProcessApp) -> None:
        async with app.client() as http:
            body = json.dumps(chat(max_tokens=20)).encode()  # a second of work
            batch = asyncio.ensure_future(app.ingress.batch_line("anonymous", Route.CHAT, body, "b1"))
            await asyncio.sleep(0.3)
            t0 = asyncio.get_running_loop().time()
            async with http.stream("POST", CHAT, json=chat(max_tokens=2, stream=True)) as resp:
                async for _ in resp.aiter_bytes():
                    break
                ttft = asyncio.get_running_loop().time() - t0
            answer = await batch
        assert answer.status == 200 and json.loads(answer.body)["usage"]["completion_tokens"] == 20
        (handle,) = app.handles.values()
        batched = [k.get("batch", False) for k in handle.keywords]
        assert batched == [True, False, True], batched  # preempted, then sent again
        assert ttft < 0.3, ttft

    with_app(cfg(tmp_path, model), scenario)


def test_with_preempt_model_an_arrival_preempts_only_the_batch_request_on_its_own_model(
    tmp_path: Path,
) -> None:
    """One lane over two models (`yield_to: app`), `preempt: model`: a chat to `a` cancels the
    batch request in flight on `a` (sent again after it) and lets the one on `b` run on."""
    slow = {"ttft_s": 0.05, "tokens_per_s": 20.0}
    models = fake("a", engine_args=slow), fake("b", engine_args=slow)

    async def scenario(app: InProcessApp) -> None:
        async with app.client() as http:
            lines = [
                asyncio.ensure_future(
                    app.ingress.batch_line(
                        "anonymous", Route.CHAT, json.dumps(chat(model=name, max_tokens=20)).encode(), name
                    )
                )
                for name in ("a", "b")
            ]
            await asyncio.sleep(0.3)
            response = await http.post(CHAT, json=chat(model="a", max_tokens=2))
            answers = await asyncio.gather(*lines)
        assert response.status_code == 200 and [a.status for a in answers] == [200, 200]
        batched = {
            name: [k.get("batch", False) for k in handle.keywords] for name, handle in app.handles.items()
        }
        assert batched == {"a": [True, False, True], "b": [True]}, batched

    with_app(cfg(tmp_path, *models, batches={"yield_to": "app", "preempt": "model"}), scenario)


def test_a_removed_key_s_batch_requests_are_refused(tmp_path: Path) -> None:
    async def scenario(app: InProcessApp) -> None:
        answer = await app.ingress.batch_line(hash_key("gone"), Route.CHAT, json.dumps(chat()).encode(), "r1")
        assert answer.status == 401
        stream = await app.ingress.batch_line(
            hash_key("k"), Route.CHAT, json.dumps(chat(stream=True)).encode(), "r2"
        )
        assert stream.status == 400

    with_app(cfg(tmp_path, auth={"api_keys": [hash_key("k")]}), scenario)


def test_the_store_is_whole_objects_only(tmp_path: Path) -> None:
    from serve_app.serving.batches.store import BatchStore

    store = BatchStore(str(tmp_path / "s"))
    store.put("a/b", b"1")
    (tmp_path / "s" / "a" / "c.123.tmp").write_bytes(b"half")  # a crash mid-write
    assert store.children("a") == ["b"] and store.get("a/b") == b"1"
    store.delete("a")
    assert store.children("a") == []
    with pytest.raises(FileNotFoundError):
        store.get("a/b")


# --- the command ------------------------------------------------------------------------------------------


def test_the_batch_command_submits_waits_with_a_progress_bar_and_writes_both_files(
    tmp_path: Path, capsys: Any
) -> None:
    requests = [line(i) for i in range(12)]
    requests[3]["body"]["n"] = 99
    path = tmp_path / "reqs.jsonl"
    path.write_bytes(jsonl(requests))

    async def scenario(app: InProcessApp) -> None:
        async with over_http(app.app) as url:

            def cli(*argv: str) -> int:
                return main(["batch", "--url", url, *argv])

            assert await asyncio.to_thread(cli, "submit", str(path), "--wait", "--interval", "0.05") == 0
            err = capsys.readouterr()
            batch_id = err.out.splitlines()[0]
            assert "12/12" in err.err and "failed=1" in err.err  # the bar's last state
            assert f"batch {batch_id} completed: 11 completed, 1 failed of 12" in err.out
            out = records((tmp_path / "reqs.output.jsonl").read_bytes())
            assert [r["custom_id"] for r in out] == [f"req-{i}" for i in range(12) if i != 3]
            assert [r["custom_id"] for r in records((tmp_path / "reqs.errors.jsonl").read_bytes())] == [
                "req-3"
            ]
            assert await asyncio.to_thread(cli, "list") == 0
            assert batch_id in capsys.readouterr().out
            assert await asyncio.to_thread(cli, "cancel", batch_id) == 1
            assert "cannot be cancelled" in capsys.readouterr().err
            (tmp_path / "bad.jsonl").write_bytes(b"nope\n")
            assert (
                await asyncio.to_thread(cli, "submit", str(tmp_path / "bad.jsonl"), "--endpoint", CHAT) == 1
            )
            assert "400: Line 1 of the file" in capsys.readouterr().err

    with_app(cfg(tmp_path), scenario)


def test_list_queries_out_of_bounds_are_400s_and_pages_follow_after(tmp_path: Path) -> None:
    async def scenario(app: InProcessApp) -> None:
        oai = client(app)
        ids = [
            (await oai.files.create(file=(f"{i}.jsonl", jsonl([line(i)])), purpose="batch")).id
            for i in range(3)
        ]
        async with app.client({"authorization": "Bearer x"}) as http:
            assert (await http.get("/v1/files", params={"limit": "x"})).status_code == 400
            assert (await http.get("/v1/batches", params={"limit": "0"})).status_code == 400
            assert (await http.get("/v1/files", params={"after": "f" * 200})).status_code == 400
            first = (await http.get("/v1/files", params={"limit": "2"})).json()
            assert first["has_more"] and len(first["data"]) == 2
            rest = (await http.get("/v1/files", params={"limit": "2", "after": first["last_id"]})).json()
            assert not rest["has_more"]
            assert sorted(f["id"] for f in first["data"] + rest["data"]) == sorted(ids)

    with_app(cfg(tmp_path), scenario)


def test_in_a_replica_a_batch_request_enters_the_engine_after_the_interactive_one_starts(
    tmp_path: Path,
) -> None:
    model = fake("small", engine_args={"ttft_s": 0.4, "tokens_per_s": 1000.0})

    async def scenario(app: InProcessApp) -> None:
        async with app.client() as http:
            t0 = asyncio.get_running_loop().time()
            interactive = asyncio.ensure_future(http.post(CHAT, json=chat(max_tokens=2)))
            await asyncio.sleep(0.05)  # the interactive request is in its first 0.4 s
            body = json.dumps(chat(max_tokens=2)).encode()
            answer = await app.ingress.batch_line("anonymous", Route.CHAT, body, "b1")
            took = asyncio.get_running_loop().time() - t0
            assert answer.status == 200 and (await interactive).status_code == 200
            # It waited for the interactive request's first token (0.4 s), then took its own.
            assert took >= 0.75, took

    with_app(cfg(tmp_path, model), scenario)


def test_with_yield_until_end_an_interactive_request_holds_batch_requests_back_to_its_end(
    tmp_path: Path,
) -> None:
    model = fake("small", engine_args={"ttft_s": 0.05, "tokens_per_s": 20.0})

    async def scenario(app: InProcessApp) -> None:
        async with app.client() as http:
            # A stream of ~0.5 s, whose first token comes at once.
            interactive = asyncio.ensure_future(http.post(CHAT, json=chat(max_tokens=10, stream=True)))
            await asyncio.sleep(0.1)
            t0 = asyncio.get_running_loop().time()
            body = json.dumps(chat(max_tokens=1)).encode()
            answer = await app.ingress.batch_line("anonymous", Route.CHAT, body, "b1")
            waited = asyncio.get_running_loop().time() - t0
            assert answer.status == 200 and (await interactive).status_code == 200
            assert waited >= 0.35, waited  # the interactive request's whole answer came first

    with_app(cfg(tmp_path, model, batches={"yield_until": "end"}), scenario)


def test_a_lane_starts_batch_requests_only_once_it_has_been_quiet_for_its_settle_time() -> None:
    async def scenario() -> None:
        lane = Lane(settle_s=0.3)
        lane.hold().release()
        t0 = asyncio.get_running_loop().time()
        await lane.quiet()
        assert asyncio.get_running_loop().time() - t0 >= 0.25
        t1 = asyncio.get_running_loop().time()
        await lane.quiet()  # quiet long enough already
        assert asyncio.get_running_loop().time() - t1 < 0.05

    run(scenario)


def test_a_lane_preempting_by_model_cancels_only_the_batch_requests_of_the_arrivals_model() -> None:
    """`preempt: model` in a lane over several models (`yield_to: app`): an arrival cancels the
    batch request that shares its engine, lets the other model's run on, and holds back both
    models' new ones until it releases."""

    async def scenario() -> None:
        lane = Lane(preempt="model")
        attempts: list[tuple[str, int]] = []

        def attempt(model: str) -> Callable[[int], Awaitable[int]]:
            async def run(preempted: int) -> int:
                attempts.append((model, preempted))
                await asyncio.sleep(0.2)
                return preempted

            return run

        same = asyncio.ensure_future(lane.run_batch(attempt("a"), "a"))
        other = asyncio.ensure_future(lane.run_batch(attempt("b"), "b"))
        await asyncio.sleep(0.05)
        hold = lane.hold("a")
        assert await asyncio.wait_for(other, 2) == 0  # model b's ran to its end beside it
        await asyncio.sleep(0.1)
        assert not same.done() and attempts == [("a", 0), ("b", 0)]  # a's cancelled, held back
        hold.release()
        assert await asyncio.wait_for(same, 2) == 1 and attempts[-1] == ("a", 1)

    run(scenario)


def test_a_lane_without_preemption_lets_batch_requests_in_flight_finish() -> None:
    async def scenario() -> None:
        lane = Lane(preempt=False)
        attempts: list[int] = []

        async def attempt(preempted: int) -> int:
            attempts.append(preempted)
            await asyncio.sleep(0.2)
            return preempted

        batch = asyncio.ensure_future(lane.run_batch(attempt))
        await asyncio.sleep(0.05)
        hold = lane.hold()
        assert await asyncio.wait_for(batch, 2) == 0 and attempts == [0]
        later = asyncio.ensure_future(lane.run_batch(attempt))  # held back meanwhile
        await asyncio.sleep(0.1)
        assert attempts == [0]
        hold.release()
        assert await asyncio.wait_for(later, 2) == 0

    run(scenario)
