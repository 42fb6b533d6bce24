"""Per-client limits and model access, as a client of a named key sees them (over real HTTP)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rolemesh_gateway.common.errors import ConfigError
from rolemesh_gateway.gateway.limits import ClientPolicy, LocalCounts
from rolemesh_gateway.gateway.settings import parse_settings
from tests.conftest import CLIENT_KEY, GatewayProcess, proxy_config, wait_until
from tests.fakes import FakeUpstream
from tests.test_registry_redis import RedisServer

Up = Callable[..., FakeUpstream]
Gw = Callable[..., GatewayProcess]

LIMITED, OTHER, TEAM = "key-limited", "key-other", "key-team"


def limited_config(*urls: str, **key: Any) -> dict[str, Any]:
    """Aliases planner/writer/coder, and a named key ``limited`` carrying ``key``'s settings."""
    names = ("planner", "writer", "coder")
    config = proxy_config(**dict(zip(names, urls, strict=False)))
    config["auth"]["client_api_keys"] = [
        CLIENT_KEY,
        {"name": "limited", "key": LIMITED, **key},
        {"name": "other", "key": OTHER, "rate_limit": {"requests_per_minute": 1000}},
    ]
    return config


def chat(c: httpx.Client, key: str, model: str | None = "planner", **body: Any) -> httpx.Response:
    payload: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], **body}
    if model is not None:
        payload["model"] = model
    return c.post("/v1/chat/completions", json=payload, headers={"Authorization": f"Bearer {key}"})


@pytest.fixture
def client() -> Iterator[Callable[[str], httpx.Client]]:
    opened: list[httpx.Client] = []

    def make(url: str) -> httpx.Client:
        c = httpx.Client(base_url=url, timeout=10)
        opened.append(c)
        return c

    yield make
    for c in opened:
        c.close()


# -- rate limits -----------------------------------------------------------------------------------
def test_a_burst_gets_exactly_its_share_then_429_with_retry_after(
    upstreams: Up, gateway: Gw, client: Callable[[str], httpx.Client]
) -> None:
    up = upstreams("p")
    gw = gateway(limited_config(up.url, rate_limit={"requests_per_minute": 60}))
    c = client(gw.url)
    statuses = [chat(c, LIMITED).status_code for _ in range(100)]
    assert statuses == [200] * 60 + [429] * 40
    r = chat(c, LIMITED)
    assert r.status_code == 429
    assert 1 <= int(r.headers["retry-after"]) <= 60
    err = r.json()["error"]
    assert err["code"] == "rate_limit_exceeded" and err["type"] == "requests"
    assert "'limited'" in err["message"] and "limit 60" in err["message"]
    assert len(up.seen) == 60  # the refused ones never reached the upstream
    # Another key, and a plain key, are unaffected.
    assert [chat(c, OTHER).status_code for _ in range(5)] == [200] * 5
    assert chat(c, CLIENT_KEY).status_code == 200
    # Anthropic clients get their own shape on /v1/messages.
    r = c.post(
        "/v1/messages",
        json={"model": "planner", "max_tokens": 5, "messages": []},
        headers={"X-Api-Key": LIMITED},
    )
    assert r.status_code == 429 and r.headers["retry-after"]
    assert r.json() == {"type": "error", "error": {"type": "rate_limit_error", "message": err["message"]}}
    # Refusals are counted by key name and reason.
    metrics = c.get("/metrics", headers={"X-Api-Key": CLIENT_KEY}).text
    assert 'rolemesh_client_rejected_total{client="limited",reason="requests_per_minute"} 42.0' in metrics
    # A client over its own limit is not an error of the fleet: the dashboard's list stays clean.
    assert c.get("/dashboard/data", headers={"X-Api-Key": CLIENT_KEY}).json()["errors"] == []


def test_the_openai_sdk_sees_a_rate_limit_error(upstreams: Up, gateway: Gw) -> None:
    import openai

    gw = gateway(limited_config(upstreams("p").url, rate_limit={"requests_per_minute": 1}))
    sdk = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=LIMITED, max_retries=0)
    messages: Any = [{"role": "user", "content": "hi"}]
    sdk.chat.completions.create(model="planner", messages=messages)
    with pytest.raises(openai.RateLimitError) as info:
        sdk.chat.completions.create(model="planner", messages=messages)
    assert info.value.code == "rate_limit_exceeded"
    assert info.value.response.headers["retry-after"]


def test_the_anthropic_sdk_sees_a_rate_limit_error(upstreams: Up, gateway: Gw) -> None:
    import anthropic

    gw = gateway(limited_config(upstreams("p").url, rate_limit={"requests_per_minute": 1}))
    sdk = anthropic.Anthropic(base_url=gw.url, api_key=LIMITED, max_retries=0)
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        assert chat(c, LIMITED).status_code == 200  # the one request of this minute
    with pytest.raises(anthropic.RateLimitError) as info:
        sdk.messages.create(model="planner", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert "Rate limit reached for client key 'limited'" in str(info.value)


def test_tokens_per_minute_counts_usage_after_the_fact(
    upstreams: Up, gateway: Gw, client: Callable[[str], httpx.Client]
) -> None:
    up = upstreams("p")  # every answer reports 6 tokens
    gw = gateway(limited_config(up.url, rate_limit={"tokens_per_minute": 20}))
    c = client(gw.url)
    # 0, 6, 12, 18 tokens used before each: admitted; then 24 >= 20: refused.
    assert [chat(c, LIMITED).status_code for _ in range(5)] == [200, 200, 200, 200, 429]
    r = chat(c, LIMITED)
    err = r.json()["error"]
    assert err["type"] == "tokens" and err["code"] == "rate_limit_exceeded", err
    assert "used 24" in err["message"] and int(r.headers["retry-after"]) >= 1
    assert chat(c, OTHER).status_code == 200


def test_tokens_of_a_stream_are_counted_from_its_usage_event(
    upstreams: Up, gateway: Gw, client: Callable[[str], httpx.Client]
) -> None:
    up = upstreams("p", chunks=5)  # a stream with include_usage reports 5 + 5 tokens
    gw = gateway(limited_config(up.url, rate_limit={"tokens_per_minute": 15}))
    c = client(gw.url)
    opts: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}
    assert chat(c, LIMITED, **opts).status_code == 200  # 10 tokens
    assert chat(c, LIMITED, **opts).status_code == 200  # 10 < 15 before it: admitted (20 now)
    assert chat(c, LIMITED, **opts).status_code == 429


def test_a_stream_that_did_not_ask_for_usage_is_counted_too(
    upstreams: Up, gateway: Gw, client: Callable[[str], httpx.Client]
) -> None:
    """Without ``stream_options.include_usage`` an upstream reports no usage in a stream: for a key
    with tokens_per_minute the gateway asks for it, so streaming is no way around the limit."""
    up = upstreams("p", chunks=5)
    gw = gateway(limited_config(up.url, rate_limit={"tokens_per_minute": 15}))
    c = client(gw.url)
    r = chat(c, LIMITED, stream=True, stream_options={"other": 1})
    assert '"usage"' in r.text and r.text.rstrip().endswith("data: [DONE]")
    assert up.seen[-1].body["stream_options"] == {"other": 1, "include_usage": True}
    assert chat(c, LIMITED, stream=True).status_code == 200
    assert chat(c, LIMITED, stream=True).status_code == 429
    # Keys without a token limit are passed through untouched.
    chat(c, OTHER, stream=True)
    assert "stream_options" not in up.seen[-1].body


def test_max_concurrent_lets_two_streams_run_and_refuses_the_third(
    upstreams: Up, gateway: Gw, client: Callable[[str], httpx.Client]
) -> None:
    up = upstreams("p", chunks=4, chunk_interval_s=0.4)
    gw = gateway(limited_config(up.url, max_concurrent=2))
    c = client(gw.url)
    body = {"model": "planner", "stream": True, "messages": []}
    hdr = {"X-Api-Key": LIMITED}
    with c.stream("POST", "/v1/chat/completions", json=body, headers=hdr) as s1:
        with c.stream("POST", "/v1/chat/completions", json=body, headers=hdr) as s2:
            assert s1.status_code == s2.status_code == 200
            started = time.monotonic()
            r = chat(c, LIMITED, stream=True)
            assert time.monotonic() - started < 0.5  # refused at once, not queued
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert "max_concurrent" in r.json()["error"]["message"]
            assert chat(c, OTHER).status_code == 200
            assert b"[DONE]" in b"".join(s2.iter_bytes())  # the streams run to their end
        assert b"[DONE]" in b"".join(s1.iter_bytes())
    assert chat(c, LIMITED).status_code == 200  # their places are free again


def test_a_stream_left_before_its_usage_counts_its_events(upstreams: Up, gateway: Gw) -> None:
    """A client that hangs up before the usage event still pays: one token per event relayed."""
    up = upstreams("p", chunks=40, chunk_interval_s=0.05)
    gw = gateway(limited_config(up.url, rate_limit={"tokens_per_minute": 5}))
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        body = {"model": "planner", "stream": True, "messages": []}
        with c.stream("POST", "/v1/chat/completions", json=body, headers={"X-Api-Key": LIMITED}) as s:
            got = b""
            for chunk in s.iter_bytes():
                got += chunk
                if got.count(b"data:") >= 6:
                    break
    with httpx.Client(base_url=gw.url, timeout=10, headers={"X-Api-Key": LIMITED}) as c:

        def refused() -> bool:  # the fake's embeddings report no usage: they add no tokens
            r = c.post("/v1/embeddings", json={"model": "planner", "input": "x"})
            return r.status_code == 429 and r.json()["error"]["type"] == "tokens"

        wait_until(refused, 5, "the events of the stream to be counted")


@pytest.mark.parametrize("counted_in", ["memory", "redis"])
def test_a_client_that_leaves_frees_its_place(
    upstreams: Up, gateway: Gw, counted_in: str, request: pytest.FixtureRequest
) -> None:
    up = upstreams("p", chunks=50, chunk_interval_s=0.1)
    config = limited_config(up.url, max_concurrent=1)
    if counted_in == "redis":
        config = shared(request.getfixturevalue("redis").url, config)
    gw = gateway(config)
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        body = {"model": "planner", "stream": True, "messages": []}
        with c.stream("POST", "/v1/chat/completions", json=body, headers={"X-Api-Key": LIMITED}) as s:
            next(s.iter_bytes())
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        deadline = time.monotonic() + 5
        while chat(c, LIMITED).status_code != 200:
            assert time.monotonic() < deadline, "the place of a client that left was never freed"
            time.sleep(0.05)


def test_local_windows_and_retry_after() -> None:
    now = [1000.0]
    counts = LocalCounts(clock=lambda: now[0])
    p = ClientPolicy("k", None, "a", ("a",), requests_per_minute=2, tokens_per_minute=10, max_concurrent=1)
    assert counts.admit(p) is None
    assert counts.admit(p) == ("max_concurrent", 1, 1.0)
    counts.release(p, 4)
    now[0] += 20
    assert counts.admit(p) is None
    counts.release(p, 7)
    assert counts.admit(p) == ("requests_per_minute", 2, 40.0)  # the window opened at 1000
    now[0] += 40  # it closed; the tokens window (opened at 1000 too) with it
    assert counts.admit(p) is None
    counts.release(p, 11)
    now[0] += 1
    assert counts.admit(p) == ("tokens_per_minute", 11, 59.0)


# -- model access ----------------------------------------------------------------------------------
def test_a_key_sees_and_uses_only_its_models(
    upstreams: Up, gateway: Gw, client: Callable[[str], httpx.Client]
) -> None:
    p, w, k = upstreams("p"), upstreams("w"), upstreams("k")
    gw = gateway(limited_config(p.url, w.url, k.url, models=["writer", "coder"]))
    c = client(gw.url)
    mine = {"Authorization": f"Bearer {LIMITED}"}
    listed = c.get("/v1/models", headers=mine).json()
    assert [m["id"] for m in listed["data"]] == ["writer", "coder"]
    assert set(listed["rolemesh"]["aliases"]) == {"writer", "coder"}
    full = c.get("/v1/models", headers={"X-Api-Key": CLIENT_KEY}).json()
    assert [m["id"] for m in full["data"]] == ["planner", "writer", "coder"]

    # Another alias answers exactly as an alias that does not exist.
    hidden, absent = chat(c, LIMITED, "planner"), chat(c, LIMITED, "no-such-model")
    assert hidden.status_code == absent.status_code == 404
    assert hidden.json()["error"]["code"] == "model_not_found"
    same = absent.json()["error"]
    same["message"] = same["message"].replace("no-such-model", "planner")
    assert hidden.json() == {"error": same}
    assert "planner" not in hidden.json()["error"]["message"].split("configured:")[1]
    r1, r2 = c.get("/v1/models/planner", headers=mine), c.get("/v1/models/nothing", headers=mine)
    assert r1.status_code == r2.status_code == 404
    assert r1.json()["error"]["message"] == "model 'planner' does not exist"
    assert c.get("/v1/models/writer", headers=mine).json()["id"] == "writer"
    assert chat(c, LIMITED, "writer").json()["choices"][0]["message"]["content"] == "hello from w"
    # Without a model: default_model is not one of its models, so its first model.
    assert chat(c, LIMITED, None).json()["choices"][0]["message"]["content"] == "hello from w"
    assert not p.seen
    # A plain key still sees and uses everything.
    assert chat(c, CLIENT_KEY, "planner").status_code == 200
    # Operator endpoints would show every alias: not for this key.
    for path in ("/metrics", "/v1/nodes", "/dashboard/data"):
        r = c.get(path, headers=mine)
        assert r.status_code == 403, (path, r.text)
        assert r.json()["error"]["type"] == "permission_error"
    metrics = c.get("/metrics", headers={"X-Api-Key": CLIENT_KEY}).text
    assert 'rolemesh_client_rejected_total{client="limited",reason="models"} 1.0' in metrics


def test_ready_tells_the_details_only_to_a_key_that_may_use_the_default(upstreams: Up, gateway: Gw) -> None:
    gw = gateway(limited_config("http://127.0.0.1:9", upstreams("w").url, models=["writer"]))
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        full = c.get("/ready", headers={"X-Api-Key": CLIENT_KEY}).json()["reason"]
        mine = c.get("/ready", headers={"X-Api-Key": LIMITED}).json()["reason"]
    assert "127.0.0.1:9" in full
    assert mine == "model 'planner' has no upstream that can serve now"


def test_models_may_name_an_alias_by_its_openai_name(upstreams: Up, gateway: Gw) -> None:
    config = limited_config(upstreams("p").url, upstreams("w").url, models=["gpt-writer"])
    config["models"]["writer"]["openai_model_name"] = "gpt-writer"
    gw = gateway(config)
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        listed = c.get("/v1/models", headers={"X-Api-Key": LIMITED}).json()
        assert [m["id"] for m in listed["data"]] == ["gpt-writer"]
        assert chat(c, LIMITED, "writer").status_code == 200
        assert chat(c, LIMITED, "gpt-writer").status_code == 200
        assert chat(c, LIMITED, "planner").status_code == 404


# -- configuration --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "error"),
    [
        ({"models": ["nope"]}, "auth.client_api_keys.0.models.0: 'nope' names no alias; allowed: planner"),
        ({"models": []}, "auth.client_api_keys.0.models: tuple should have at least 1 item"),
        ({"rate_limit": {"requests_per_minute": 0}}, "requests_per_minute: got 0; input should be greater"),
        ({"rate_limit": {"tokens_per_minute": -5}}, "tokens_per_minute: got -5; input should be greater"),
        ({"rate_limit": {}}, "rate_limit: set requests_per_minute, tokens_per_minute or both"),
        ({"rate_limit": {"rpm": 3}}, "rate_limit.rpm: unknown key; allowed here: requests_per_minute"),
        ({"max_concurrent": 0}, "auth.client_api_keys.0.max_concurrent: got 0; input should be greater"),
        (
            {"max_concurent": 2},
            "auth.client_api_keys.0.max_concurent: unknown key; "
            "allowed here: name, key, rate_limit, max_concurrent, models",
        ),
    ],
)
def test_nonsense_limits_are_refused_in_one_line(key: dict[str, Any], error: str) -> None:
    config = proxy_config(planner="http://127.0.0.1:1")
    config["auth"]["client_api_keys"] = [{"name": "a", "key": "k", **key}]
    with pytest.raises(ConfigError) as info:
        parse_settings(config)
    assert error in str(info.value) and "\n" not in str(info.value)


def test_a_named_key_listed_twice_is_refused() -> None:
    config = proxy_config(planner="http://127.0.0.1:1")
    config["auth"]["client_api_keys"] = ["k", {"name": "a", "key": "k", "max_concurrent": 1}]
    with pytest.raises(ConfigError, match="a named key's key is listed twice"):
        parse_settings(config)


def test_limits_survive_a_reload(upstreams: Up, gateway: Gw, tmp_path: Path) -> None:
    """A config reload (SIGHUP) keeps the counts of the running window."""
    gw = gateway(limited_config(upstreams("p").url, rate_limit={"requests_per_minute": 3}))
    app: Any = gw.app  # type: ignore[attr-defined]
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        assert [chat(c, LIMITED).status_code for _ in range(3)] == [200] * 3
        done = threading.Event()

        def apply() -> None:
            app._apply(app.settings)
            done.set()

        gw._loop.call_soon_threadsafe(apply)  # type: ignore[attr-defined]
        assert done.wait(5)
        assert chat(c, LIMITED).status_code == 429


# -- across gateways (a real redis-server) ----------------------------------------------------------
@pytest.fixture(name="redis")
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def shared(redis_url: str, config: dict[str, Any]) -> dict[str, Any]:
    return {**config, "registry": {"backend": "redis", "redis_url": redis_url, "sync_interval_s": 0.2}}


def test_the_limit_holds_across_two_gateways(redis: RedisServer, upstreams: Up, gateway: Gw) -> None:
    config = shared(redis.url, limited_config(upstreams("p").url, rate_limit={"requests_per_minute": 60}))
    gws = [gateway(config), gateway(config)]
    clients = [httpx.Client(base_url=gw.url, timeout=10) for gw in gws]
    try:
        statuses = [chat(clients[i % 2], LIMITED).status_code for i in range(100)]
        assert statuses.count(200) == 60 and statuses[:60] == [200] * 60, statuses
        for c in clients:
            r = chat(c, LIMITED)
            assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60
            assert chat(c, OTHER).status_code == 200
    finally:
        for c in clients:
            c.close()


def test_tokens_are_counted_across_two_gateways(redis: RedisServer, upstreams: Up, gateway: Gw) -> None:
    config = shared(redis.url, limited_config(upstreams("p").url, rate_limit={"tokens_per_minute": 20}))
    gws = [gateway(config), gateway(config)]
    with httpx.Client(timeout=10) as c:
        statuses = [
            c.post(
                f"{gws[i % 2].url}/v1/completions", json={"model": "planner"}, headers={"X-Api-Key": LIMITED}
            )
            for i in range(5)
        ]
    assert [r.status_code for r in statuses] == [200, 200, 200, 200, 429]
    assert statuses[-1].json()["error"]["type"] == "tokens"


def test_max_concurrent_holds_across_two_gateways(redis: RedisServer, upstreams: Up, gateway: Gw) -> None:
    up = upstreams("p", chunks=4, chunk_interval_s=0.3)
    config = shared(redis.url, limited_config(up.url, max_concurrent=1))
    gw1, gw2 = gateway(config), gateway(config)
    body = {"model": "planner", "stream": True, "messages": []}
    with httpx.Client(base_url=gw1.url, timeout=10) as c1, httpx.Client(base_url=gw2.url, timeout=10) as c2:
        with c1.stream("POST", "/v1/chat/completions", json=body, headers={"X-Api-Key": LIMITED}) as s:
            assert s.status_code == 200
            r = chat(c2, LIMITED)
            assert r.status_code == 429 and "max_concurrent" in r.json()["error"]["message"]
            b"".join(s.iter_bytes())
        assert chat(c2, LIMITED).status_code == 200  # released in Redis at the stream's end


def test_without_redis_each_gateway_limits_alone_and_says_so_once(
    redis: RedisServer, upstreams: Up, gateway: Gw
) -> None:
    config = shared(redis.url, limited_config(upstreams("p").url, rate_limit={"requests_per_minute": 4}))
    gw1, gw2 = gateway(config, process=True), gateway(config, process=True)
    with gw1.client(LIMITED) as c:
        assert [chat(c, LIMITED).status_code for _ in range(2)] == [200, 200]  # counted in Redis

    redis.stop()
    for gw in (gw1, gw2):  # served, with this gateway's own count of the window
        with gw.client(LIMITED) as c:
            started = time.monotonic()
            statuses = [chat(c, LIMITED).status_code for _ in range(6)]
            assert statuses == [200] * 4 + [429] * 2, statuses
            assert time.monotonic() - started < 3
    for gw in (gw1, gw2):
        log = gw.log_text()
        assert log.count("per-client limits: Redis at") == 1, log[-3000:]
        assert "counts the limits of its clients alone" in log
        assert "Traceback" not in log

    redis.start()  # back (and empty): counted in Redis again, and said so once
    for gw in (gw1, gw2):
        with gw.client(LIMITED) as c:

            def back(c: httpx.Client = c, gw: GatewayProcess = gw) -> bool:
                return chat(c, LIMITED).status_code == 200 and "across gateways again" in gw.log_text()

            wait_until(back, 5, "limits counted in Redis again")
        assert gw.log_text().count("limits hold across gateways again") == 1
