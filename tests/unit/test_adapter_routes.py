"""LoRA adapters through the ingress, in this process (fake engine): requests by adapter name,
/v1/models, quotas and the access log, and the admin routes that add and remove adapters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from serve_app.guards.auth import hash_key
from tests.conftest import ROOT
from tests.support.inprocess import CHAT, InProcessApp, chat, config, fake, serve

DEMO = ROOT / "models" / "adapters"
BASE = "tiny-mistral-v3"
LORA = [f"{BASE}-lora-{i}" for i in range(8)]
ADMIN = {"Authorization": "Bearer admin-key"}


def _model(source_dir: Path = DEMO, **extra: Any) -> dict[str, Any]:
    lora = {"max_loras": 1, "max_lora_rank": 8, "source_dirs": [str(source_dir)]}
    adapter = {"name": LORA[0], "aliases": ["support-bot"], "source": str(source_dir / LORA[0])}
    return fake(BASE, lora=lora, adapters=[adapter], **extra)


def test_an_adapter_is_served_by_its_name_and_listed_under_its_base(access_log: list[dict[str, Any]]) -> None:
    async def scenario(app: InProcessApp) -> None:
        async with app.client() as http:
            resp = await http.post(CHAT, json=chat(LORA[0]))
            assert resp.status_code == 200, resp.text
            answer = resp.json()
            assert answer["model"] == LORA[0] and answer["choices"][0]["message"]["content"].startswith(
                f"{LORA[0]}-tok0"
            )
            base = (await http.post(CHAT, json=chat(BASE))).json()
            assert base["choices"][0]["message"]["content"].startswith("tok0")
            by_alias = (await http.post(CHAT, json=chat("support-bot"))).json()
            assert by_alias["model"] == LORA[0] and by_alias["choices"] == answer["choices"]
            listed = {m["id"]: m for m in (await http.get("/v1/models")).json()["data"]}
            assert listed[LORA[0]]["parent"] == BASE and listed[LORA[0]]["root"] == BASE
            assert listed["support-bot"]["parent"] == BASE and listed["support-bot"]["aliases"] == [LORA[0]]
            assert (await http.get(f"/v1/models/{LORA[0]}")).json()["parent"] == BASE
            assert (await http.post(CHAT, json=chat(LORA[1]))).status_code == 404
        (handle,) = app.handles.values()
        assert handle.keywords[0]["adapter"].name == LORA[0] and "adapter" not in handle.keywords[1]
        assert handle.keywords[2]["adapter"] == handle.keywords[0]["adapter"]  # the alias: the same adapter
        lines = [e for e in access_log if e["route"] == "chat"]
        assert [(e["model"], e["adapter"]) for e in lines[:3]] == [
            (BASE, LORA[0]),
            (BASE, None),
            (BASE, LORA[0]),
        ]

    serve(config(_model()), scenario)


def test_a_keys_quota_on_an_adapter_name_holds_its_requests_only() -> None:
    key = hash_key("k")
    quotas = {"keys": {key: {"models": {LORA[0]: {"requests_per_minute": 1}}}}}
    cfg = config(_model(), auth={"api_keys": [key]}, quotas=quotas)

    async def scenario(app: InProcessApp) -> None:
        async with app.client({"Authorization": "Bearer k"}) as http:
            assert (await http.post(CHAT, json=chat(LORA[0]))).status_code == 200
            assert (await http.post(CHAT, json=chat(LORA[0]))).status_code == 429
            assert (await http.post(CHAT, json=chat(BASE))).status_code == 200

    serve(cfg, scenario)


def test_the_admin_routes_are_off_unless_configured() -> None:
    async def scenario(app: InProcessApp) -> None:
        async with app.client() as http:
            body = {"lora_name": "x", "lora_path": str(DEMO / LORA[1])}
            for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
                assert (await http.post(path, json=body, headers=ADMIN)).status_code == 404

    serve(config(_model()), scenario)


def _admin_config(source_dir: Path) -> Any:
    auth = {"api_keys": [hash_key("api-key")], "admin": {"api_keys": [hash_key("admin-key")]}}
    return config(_model(source_dir), fake("other"), auth=auth)


def _copy_adapters(tmp_path: Path) -> Path:
    allowed = tmp_path / "adapters"
    for name in LORA[:2]:
        shutil.copytree(DEMO / name, allowed / name)
    big = allowed / "rank-16"
    shutil.copytree(DEMO / LORA[2], big)
    adapter_config = json.loads((big / "adapter_config.json").read_text())
    (big / "adapter_config.json").write_text(json.dumps({**adapter_config, "r": 16}))
    return allowed


def test_an_admin_adds_and_removes_adapters_and_bad_ones_get_a_clear_4xx(tmp_path: Path) -> None:
    allowed = _copy_adapters(tmp_path)
    load, unload = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"
    api = {"Authorization": "Bearer api-key"}

    async def scenario(app: InProcessApp) -> None:
        async with app.client() as http:
            good = {"lora_name": "sql", "lora_path": str(allowed / LORA[1]), "model": BASE}
            for headers in ({}, api, {"Authorization": "Bearer wrong"}):
                assert (await http.post(load, json=good, headers=headers)).status_code == 401
            refused = [
                ({**good, "lora_path": str(allowed / ".." / ".." / "etc")}, 403, "outside"),
                ({**good, "lora_path": str(allowed / "missing")}, 404, "does not exist"),
                ({**good, "lora_path": str(allowed / "rank-16")}, 400, "rank 16"),
                ({**good, "lora_path": "org/adapter"}, 400, "local directory"),
                ({**good, "lora_name": BASE}, 400, "already been loaded"),
                ({**good, "lora_name": "../x"}, 400, "lora_name must be"),
                ({**good, "model": "other"}, 400, "serves no LoRA adapters"),
                ({**good, "lora_path": "/" + "x" * 5000}, 400, "longer than"),
                ({"lora_path": str(allowed / LORA[1])}, 400, "'lora_name' must be provided"),
            ]
            for body, status, message in refused:
                resp = await http.post(load, json=body, headers=ADMIN)
                assert resp.status_code == status and message in resp.json()["error"]["message"], resp.text
            assert (await http.post(CHAT, json=chat("sql"), headers=api)).status_code == 404  # nothing booked
            resp = await http.post(load, json=good, headers=ADMIN)
            assert resp.status_code == 200 and resp.text == "Success: LoRA adapter 'sql' added successfully."
            assert (await http.post(load, json=good, headers=ADMIN)).status_code == 400  # once
            answer = (await http.post(CHAT, json=chat("sql"), headers=api)).json()
            assert answer["model"] == "sql" and answer["choices"][0]["message"]["content"].startswith(
                "sql-tok0"
            )
            listed = {m["id"]: m for m in (await http.get("/v1/models", headers=api)).json()["data"]}
            assert listed["sql"]["parent"] == BASE
            resp = await http.post(unload, json={"lora_name": LORA[0]}, headers=ADMIN)
            assert resp.status_code == 400 and "comes from the config" in resp.text
            assert (await http.post(unload, json={"lora_name": "sql"}, headers=ADMIN)).status_code == 200
            assert (await http.post(unload, json={"lora_name": "sql"}, headers=ADMIN)).status_code == 404
            assert (await http.post(CHAT, json=chat("sql"), headers=api)).status_code == 404
            assert (await http.post(CHAT, json=chat(LORA[0]), headers=api)).status_code == 200  # undisturbed

    serve(_admin_config(allowed), scenario)


def test_an_adapter_that_stops_loading_fails_its_request_with_a_4xx(tmp_path: Path) -> None:
    allowed = _copy_adapters(tmp_path)

    async def scenario(app: InProcessApp) -> None:
        async with app.client({"Authorization": "Bearer api-key"}) as http:
            good = {"lora_name": "sql", "lora_path": str(allowed / LORA[1])}
            assert (await http.post("/v1/load_lora_adapter", json=good, headers=ADMIN)).status_code == 200
            shutil.rmtree(allowed / LORA[1])  # gone before its first request
            resp = await http.post(CHAT, json=chat("sql"))
            assert resp.status_code == 404 and "does not exist" in resp.json()["error"]["message"]
            assert (await http.post(CHAT, json=chat(BASE))).status_code == 200

    serve(_admin_config(allowed), scenario)
