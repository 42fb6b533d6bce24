"""``GET /metrics``: exact counts for requests of known outcomes, read with Prometheus' own parser."""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from typing import Any

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from rolemesh_gateway.gateway.app import create_app
from rolemesh_gateway.gateway.metrics import Histogram
from rolemesh_gateway.gateway.settings import parse_settings
from tests.conftest import GatewayProcess
from tests.fakeclient import FakeClient, Reply, call_app, run
from tests.fakes import FakeUpstream

Gw = Callable[..., GatewayProcess]
TEAM_A, TEAM_B, ADMIN = "team-a-secret", "team-b-secret", "admin-secret"


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, by name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(all_: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return all_.get((name, frozenset(labels.items())), 0.0)


def config(writer: str, broken: str, **auth: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "default_model": "writer",
        "auth": {
            "client_api_keys": [{"name": "team-a", "key": TEAM_A}, TEAM_B],
            **auth,
        },
        "models": {
            "writer": {"type": "proxy", "proxy_url": writer},
            "broken": {"type": "proxy", "proxy_url": broken},
        },
    }


def test_counts_of_known_outcomes_are_exact(gateway: Gw, upstreams: Callable[..., FakeUpstream]) -> None:
    writer = upstreams("writer", chunks=4)
    broken = upstreams("broken", status=500)
    gw = gateway(config(writer.url, broken.url))
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=TEAM_A, max_retries=0)
    seen_prompt = seen_completion = 0
    for _ in range(3):  # ok, with usage in the answer
        r = client.chat.completions.create(model="writer", messages=[{"role": "user", "content": "hi"}])
        assert r.usage is not None
        seen_prompt += r.usage.prompt_tokens
        seen_completion += r.usage.completion_tokens
    for _ in range(2):  # streams, with the usage chunk
        stream = client.chat.completions.create(
            model="writer", messages=[], stream=True, stream_options={"include_usage": True}
        )
        for chunk in stream:
            if chunk.usage is not None:
                seen_prompt += chunk.usage.prompt_tokens
                seen_completion += chunk.usage.completion_tokens
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        assert (
            c.post(
                "/v1/chat/completions", json={"model": "gpt-4o"}, headers={"X-Api-Key": TEAM_A}
            ).status_code
            == 404
        )
        assert c.post("/v1/chat/completions", json={"model": "writer"}).status_code == 401
        for _ in range(2):
            r = c.post("/v1/chat/completions", json={"model": "broken"}, headers={"X-Api-Key": TEAM_B})
            assert r.status_code == 500
        text = c.get("/metrics", headers={"Authorization": f"Bearer {TEAM_A}"}).text
    m = samples(text)
    chat = "/v1/chat/completions"
    assert value(m, "rolemesh_requests_total", alias="writer", endpoint=chat, status="200") == 5
    assert value(m, "rolemesh_requests_total", alias="unknown", endpoint=chat, status="404") == 1
    assert value(m, "rolemesh_requests_total", alias="unknown", endpoint=chat, status="401") == 1
    assert value(m, "rolemesh_requests_total", alias="broken", endpoint=chat, status="500") == 2
    assert value(m, "rolemesh_request_duration_seconds_count", alias="writer", endpoint=chat) == 5
    assert value(m, "rolemesh_time_to_first_token_seconds_count", alias="writer") == 2
    assert value(m, "rolemesh_upstream_attempts_total", alias="writer", node="writer", outcome="ok") == 5
    assert (
        value(m, "rolemesh_upstream_attempts_total", alias="broken", node="broken", outcome="http_error") == 2
    )
    assert value(m, "rolemesh_client_requests_total", client="team-a", alias="writer", status="200") == 5
    # A plain key is named after its hash, never shown itself.
    assert TEAM_B not in text and TEAM_A not in text
    assert any(
        dict(labels).get("client", "").startswith("key-") and dict(labels).get("alias") == "broken"
        for (name, labels) in m
        if name == "rolemesh_client_requests_total"
    )
    # The tokens counted are the usage the client saw.
    assert seen_prompt and seen_completion
    assert value(m, "rolemesh_tokens_total", alias="writer", client="team-a", kind="prompt") == seen_prompt
    assert (
        value(m, "rolemesh_tokens_total", alias="writer", client="team-a", kind="completion")
        == seen_completion
    )
    assert value(m, "rolemesh_inflight_requests", alias="writer") == 0


def test_random_model_names_add_no_series() -> None:
    async def go() -> None:
        settings = parse_settings(config("http://w.test", "http://b.test"), env={})
        app = create_app(settings, client=FakeClient().on("http://w.test", Reply.json(200, {})))  # type: ignore[arg-type]
        auth = [(b"x-api-key", TEAM_A.encode())]
        await call_app(app, "POST", "/v1/chat/completions", {"model": "writer"}, auth)
        await call_app(app, "POST", "/v1/chat/completions", {"model": "first-unknown"}, auth)
        before = len((await call_app(app, "GET", "/metrics", headers=auth)).body.splitlines())
        rng = random.Random(7)
        for _ in range(10_000):
            name = "".join(rng.choices(string.ascii_letters, k=12))
            sent = await call_app(app, "POST", "/v1/chat/completions", {"model": name}, auth)
            assert sent.status == 404
        text = (await call_app(app, "GET", "/metrics", headers=auth)).body.decode()
        after = len(text.splitlines())
        assert after - before <= 3, (
            "a series per random model name?"
        )  # the one 404 series, plus its histogram lines
        m = samples(text)
        assert (
            value(
                m, "rolemesh_requests_total", alias="unknown", endpoint="/v1/chat/completions", status="404"
            )
            == 10_001
        )

    run(go(), timeout_s=120)


def test_metrics_need_a_key_and_an_admin_key_when_there_are_any(
    gateway: Gw, upstreams: Callable[..., FakeUpstream]
) -> None:
    up = upstreams("w")
    plain = gateway(config(up.url, up.url))
    assert httpx.get(f"{plain.url}/metrics").status_code == 401
    assert httpx.get(f"{plain.url}/metrics", headers={"Authorization": f"Bearer {TEAM_B}"}).status_code == 200
    admin = gateway(config(up.url, up.url, admin_api_keys=[{"name": "ops", "key": ADMIN}]))
    assert httpx.get(f"{admin.url}/metrics").status_code == 401
    assert httpx.get(f"{admin.url}/metrics", headers={"Authorization": f"Bearer {TEAM_A}"}).status_code == 401
    ok = httpx.get(f"{admin.url}/metrics", headers={"Authorization": f"Bearer {ADMIN}"})
    assert ok.status_code == 200 and ok.headers["content-type"].startswith("text/plain")
    assert "rolemesh_requests_total" in ok.text
    # The node list is an operator endpoint too.
    assert httpx.get(f"{admin.url}/v1/nodes", headers={"X-Api-Key": TEAM_A}).status_code == 401
    assert httpx.get(f"{admin.url}/v1/nodes", headers={"X-Api-Key": ADMIN}).status_code == 200


def test_a_request_id_is_kept_or_made_sent_upstream_and_in_the_json_access_line(
    gateway: Gw, upstreams: Callable[..., FakeUpstream]
) -> None:
    up = upstreams("writer")
    env = {"ROLE_MESH_LOG_FORMAT": "json", "ROLE_MESH_ACCESS_LOG": "1"}
    gw = gateway(config(up.url, up.url), env=env, process=True)  # the guide's uvicorn command
    with httpx.Client(base_url=gw.url, headers={"X-Api-Key": TEAM_A}) as c:
        mine = c.post("/v1/chat/completions", json={}, headers={"X-Request-Id": "trace-42"})
        made = c.post("/v1/chat/completions", json={})
        error = c.post("/v1/chat/completions", json={"model": "nope"}, headers={"X-Request-Id": "trace-43"})
    assert mine.headers["x-request-id"] == "trace-42"
    assert made.headers["x-request-id"] and made.headers["x-request-id"] != "trace-42"
    assert error.status_code == 404 and error.headers["x-request-id"] == "trace-43"  # errors too
    assert [s.headers.get("x-request-id") for s in up.seen] == ["trace-42", made.headers["x-request-id"]]
    gw.stop()
    lines = [json.loads(line) for line in gw.log_text().splitlines() if line.startswith("{")]
    access = {line["request_id"]: line for line in lines if line["logger"] == "rolemesh.access"}
    line = access["trace-42"]
    assert line["client"] == "team-a" and line["alias"] == "writer" and line["status"] == 200
    assert line["prompt_tokens"] == 3 and line["completion_tokens"] == 3 and line["duration_ms"] > 0
    assert access[made.headers["x-request-id"]]["status"] == 200
    assert access["trace-43"]["status"] == 404


def test_histogram_quantiles_and_buckets() -> None:
    h = Histogram((0.1, 0.5, 1.0))
    for v in (0.05, 0.2, 0.3, 0.7, 5.0):
        h.observe(v)
    assert h.buckets() == [("0.1", 1.0), ("0.5", 3.0), ("1.0", 4.0), ("+Inf", 5.0)]
    assert h.quantile(0.5) == 0.5 and h.quantile(0.8) == 1.0 and Histogram((1.0,)).quantile(0.5) is None


def test_prompt_cache_tokens_come_from_the_usage_or_timings_the_server_reports() -> None:
    """What the real llama-server b11434 sends (checked by hand): usage with
    ``prompt_tokens_details.cached_tokens`` and ``timings`` with ``cache_n``/``prompt_n``."""
    usage = {"prompt_tokens": 646, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 645}}
    last = {"choices": [], "usage": usage, "timings": {"cache_n": 645, "prompt_n": 1}}
    answers = [
        Reply.json(200, {"choices": [], "usage": usage}),  # OpenAI usage only: 645 cached, 1 processed
        Reply.sse(  # a stream: the last event carries usage and timings (timings win: exact)
            b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n',
            b"data: " + json.dumps(last).encode() + b"\n\ndata: [DONE]\n\n",
        ),
        Reply.json(200, {"content": "x", "timings": {"cache_n": 0, "prompt_n": 300}}),  # /completion
        Reply.json(200, {"usage": {"input_tokens": 10, "cache_read_input_tokens": 90, "output_tokens": 1}}),
        Reply.json(
            200, {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1}}
        ),  # no cache info
    ]

    async def go() -> None:
        settings = parse_settings(config("http://w.test", "http://b.test"), env={})
        fake = FakeClient()
        for answer in answers:
            fake.then(answer)
        app = create_app(settings, client=fake)  # type: ignore[arg-type]
        auth = [(b"x-api-key", TEAM_A.encode())]
        for _ in answers:
            sent = await call_app(app, "POST", "/v1/chat/completions", {"model": "writer"}, auth)
            assert sent.status == 200
        m = samples((await call_app(app, "GET", "/metrics", headers=auth)).body.decode())
        cached = value(m, "rolemesh_prompt_cache_tokens_total", alias="writer", kind="cached")
        processed = value(m, "rolemesh_prompt_cache_tokens_total", alias="writer", kind="processed")
        assert (cached, processed) == (645 + 645 + 0 + 90, 1 + 1 + 300 + 10)

    run(go())
