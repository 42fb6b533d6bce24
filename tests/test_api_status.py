"""The status endpoints, called as an ASGI app: /health, /ready, /v1/models, /v1/models/{id}."""

from __future__ import annotations

import time
from typing import Any

from rolemesh_gateway.common.errors import UpstreamUnreachable
from rolemesh_gateway.common.protocol import NODE_KEY, HeartbeatRequest, RegisterRequest
from rolemesh_gateway.gateway.app import Gateway, create_app
from rolemesh_gateway.gateway.registry import MemoryRegistry
from rolemesh_gateway.gateway.settings import parse_settings
from tests.fakeclient import FakeClient, Raise, Reply, Sent, call_app, run

CLIENT_KEY = "client-key-1"
NODE_KEY_VALUE = "node-key-1"
AS_CLIENT = [(b"x-api-key", CLIENT_KEY.encode())]
PROXY = "http://proxy.test:8001"


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class World:
    def __init__(self) -> None:
        settings = parse_settings(
            {
                "version": 1,
                "default_model": "writer",
                "auth": {"client_api_keys": [CLIENT_KEY], "node_api_keys": [NODE_KEY_VALUE]},
                "nodes": {"stale_after_s": 30, "eject_after_failures": 1, "eject_for_s": 60},
                "models": {
                    "writer": {
                        "type": "discovered",
                        "role": "writer",
                        "openai_model_name": "rolemesh-writer",
                    },
                    "coder": {"type": "discovered", "role": "coder", "strategy": "least_busy"},
                    "hosted": {"type": "proxy", "proxy_url": PROXY},
                },
            },
            env={},
        )
        self.clock = Clock()
        self.registry = MemoryRegistry(stale_after_s=30, evict_after_s=3600, max_nodes=100, clock=self.clock)
        self.client = FakeClient()
        self.app: Gateway = create_app(settings, self.registry, self.client)  # type: ignore[arg-type]

    async def node(self, node_id: str, *roles: str) -> None:
        req = RegisterRequest(node_id=node_id, base_url=f"http://{node_id}.test:8091", roles=list(roles))
        await self.registry.register(req, None)

    async def get(self, path: str, headers: list[tuple[bytes, bytes]] | None = None) -> Sent:
        return await call_app(self.app, "GET", path, headers=AS_CLIENT if headers is None else headers)

    async def aliases(self) -> dict[str, dict[str, Any]]:
        sent = await self.get("/v1/models")
        assert sent.status == 200
        aliases: dict[str, dict[str, Any]] = sent.json()["rolemesh"]["aliases"]
        return aliases


def counts(info: dict[str, Any]) -> tuple[int, int, int]:
    return info["fresh_nodes"], info["stale_nodes"], info["ejected_nodes"]


def test_health_is_always_200_without_a_key() -> None:
    async def go() -> None:
        sent = await World().get("/health", headers=[])
        assert sent.status == 200 and sent.json() == {"status": "ok"}

    run(go())


def test_ready_follows_the_default_alias() -> None:
    async def go() -> None:
        w = World()
        sent = await w.get("/ready")
        assert sent.status == 503
        assert sent.json() == {
            "status": "not_ready",
            "default_model": "writer",
            "reason": "no node has registered role 'writer'",
        }
        await w.node("n1", "writer")
        sent = await w.get("/ready", headers=[])
        assert sent.status == 200 and sent.json() == {"status": "ready", "default_model": "writer"}
        w.clock.now += 30
        sent = await w.get("/ready")  # a client key: the details
        assert sent.status == 503 and "1 stale, ejected or draining" in sent.json()["reason"]
        sent = await w.get("/ready", headers=[])  # no key: general words, nothing internal
        assert sent.status == 503 and "stale" not in sent.json()["reason"]
        assert (
            sent.json()["reason"]
            == "model 'writer' has no upstream that can serve now (send a client key for details)"
        )

    run(go())


def test_models_lists_what_can_serve_now_and_why_the_others_cannot() -> None:
    async def go() -> None:
        w = World()
        await w.node("n1", "writer")
        sent = await w.get("/v1/models")
        body = sent.json()
        assert [m["id"] for m in body["data"]] == ["rolemesh-writer"]
        created = body["data"][0].pop("created")
        assert body["data"][0] == {"id": "rolemesh-writer", "object": "model", "owned_by": "rolemesh"}
        assert abs(created - time.time()) < 3600  # a real time: when the gateway started
        assert body["object"] == "list"
        assert body["rolemesh"]["unavailable_models"] == ["coder", "hosted"]
        aliases = body["rolemesh"]["aliases"]
        assert aliases["writer"] == {
            "id": "rolemesh-writer",
            "available": True,
            "type": "discovered",
            "cold": False,
            "role": "writer",
            "strategy": "round_robin",
            "fresh_nodes": 1,
            "stale_nodes": 0,
            "ejected_nodes": 0,
            "draining_nodes": 0,
        }
        assert aliases["coder"]["reason"] == "no node has registered role 'coder'"
        assert aliases["coder"]["strategy"] == "least_busy" and counts(aliases["coder"]) == (0, 0, 0)
        assert aliases["hosted"] == {
            "id": "hosted",
            "available": False,
            "type": "proxy",
            "reason": "not probed yet",
        }

    run(go())


def test_models_needs_a_client_key() -> None:
    async def go() -> None:
        w = World()
        assert (await w.get("/v1/models", headers=[])).status == 401
        assert (await w.get("/v1/models", headers=[(NODE_KEY, NODE_KEY_VALUE.encode())])).status == 401
        assert (await w.get("/v1/models/rolemesh-writer", headers=[])).status == 401

    run(go())


def test_counts_agree_with_available_for_every_state() -> None:
    async def go() -> None:
        w = World()
        await w.node("old", "writer")
        w.clock.now += 31
        info = (await w.aliases())["writer"]
        assert not info["available"] and counts(info) == (0, 1, 0)
        await w.node("new", "writer")
        info = (await w.aliases())["writer"]
        assert info["available"] and counts(info) == (1, 1, 0)

    run(go())


def test_an_alias_whose_only_node_is_ejected_is_unavailable() -> None:
    async def go() -> None:
        w = World()  # eject_after_failures 1
        await w.node("n1", "writer")
        w.client.on("http://n1.test:8091", Raise(UpstreamUnreachable("cannot connect to node n1")))
        chat = await call_app(w.app, "POST", "/v1/chat/completions", {"model": "writer"}, AS_CLIENT)
        assert chat.status == 502
        sent = await w.get("/v1/models")
        body = sent.json()
        info = body["rolemesh"]["aliases"]["writer"]
        assert info["available"] is False and counts(info) == (0, 0, 1)
        assert "rolemesh-writer" in body["rolemesh"]["unavailable_models"]
        assert "rolemesh-writer" not in [m["id"] for m in body["data"]]
        assert (await w.get("/ready", headers=[])).status == 503
        # It exists: retrieving it says it cannot serve now, as a chat call would (503).
        retrieved = await w.get("/v1/models/rolemesh-writer")
        assert retrieved.status == 503 and retrieved.json()["error"]["code"] == "no_upstream_available"
        assert "cannot serve now" in retrieved.json()["error"]["message"]
        # After the cool-down it is back, by the same rule everywhere.
        for step in range(3):  # the node keeps heartbeating through the cool-down
            if step:
                assert counts((await w.aliases())["writer"]) == (0, 0, 1)  # a heartbeat does not lift it
            w.clock.now += 20
            await w.registry.heartbeat(HeartbeatRequest(node_id="n1"))
        info = (await w.aliases())["writer"]
        assert info["available"] is True and counts(info) == (1, 0, 0)

    run(go())


def test_a_probed_proxy_alias_is_available() -> None:
    async def go() -> None:
        w = World()
        w.client.on(PROXY + "/health", Reply.json(200, {"status": "ok"}))
        await w.app.health.probe_all()
        info = (await w.aliases())["hosted"]
        assert info == {"id": "hosted", "available": True, "type": "proxy"}
        assert (await w.get("/v1/models/hosted")).status == 200

    run(go())


def test_model_by_id_answers_for_available_aliases_by_either_name() -> None:
    async def go() -> None:
        w = World()
        await w.node("n1", "writer", "coder")
        for name in ("rolemesh-writer", "writer"):
            sent = await w.get(f"/v1/models/{name}")
            assert sent.status == 200
            got = sent.json()
            assert isinstance(got.pop("created"), int)
            assert got == {"id": "rolemesh-writer", "object": "model", "owned_by": "rolemesh"}
        assert (await w.get("/v1/models/coder")).json()["id"] == "coder"
        missing = await w.get("/v1/models/gpt-4o")
        assert missing.status == 404
        assert missing.json()["error"]["message"] == "model 'gpt-4o' does not exist"
        assert missing.json()["error"]["code"] == "model_not_found"
        down = await w.get("/v1/models/hosted")  # configured, but not up: 503 with the reason
        assert down.status == 503 and down.header(b"retry-after") == b"5"

    run(go())


def test_ready_when_default_model_is_given_by_its_openai_name() -> None:
    # The settings accept default_model as an alias or an openai_model_name; /ready must answer.
    async def go() -> None:
        settings = parse_settings(
            {
                "version": 1,
                "default_model": "rolemesh-writer",
                "models": {
                    "writer": {"type": "discovered", "role": "writer", "openai_model_name": "rolemesh-writer"}
                },
            },
            env={},
        )
        registry = MemoryRegistry(stale_after_s=30, evict_after_s=3600, max_nodes=10, clock=Clock())
        app = create_app(settings, registry, FakeClient())  # type: ignore[arg-type]
        sent = await call_app(app, "GET", "/ready")
        assert sent.status == 503
        assert sent.json()["reason"] == "no node has registered role 'writer'"

    run(go())
