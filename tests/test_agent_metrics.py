"""The agent's ``GET /metrics``: its own series and its llama-servers', one scrape per host."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.agents import AgentProcess
from tests.conftest import NODE_KEY
from tests.fakes import write_fake_llama_server

Ag = Callable[..., AgentProcess]
KEY = {"X-RoleMesh-Node-Key": NODE_KEY}


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_agent_metrics_carry_its_own_series_and_the_llama_servers_with_a_role(
    agent: Ag, tmp_path: Path
) -> None:
    binary, model = write_fake_llama_server(tmp_path)
    spec = {"model": str(model), "binary": str(binary)}
    a = agent(
        {
            "node_id": "n1",
            "gateway_url": "http://127.0.0.1:9",
            "node_key": NODE_KEY,
            "roles": {
                "planner": {"llama_server": spec},
                "writer": {"llama_server": {**spec, "metrics": False}},
            },
        }
    )
    a.wait_ready(30)
    assert httpx.get(f"{a.url}/metrics").status_code == 401  # the node key, like everything but /health
    body = {"model": "planner", "messages": []}
    for _ in range(3):
        assert httpx.post(f"{a.url}/v1/chat/completions", json=body, headers=KEY).status_code == 200
    r = httpx.get(f"{a.url}/metrics", headers=KEY)
    assert r.status_code == 200
    m = samples(r.text)
    assert m[("rolemesh_agent_backend_up", frozenset({("role", "planner")}))] == 1
    assert m[("rolemesh_agent_backend_up", frozenset({("role", "writer")}))] == 1
    assert m[("rolemesh_agent_restarts_total", frozenset({("role", "planner")}))] == 0
    assert m[("rolemesh_agent_requests_total", frozenset({("role", "planner"), ("status", "200")}))] == 3
    # The stand-in's own series, labelled with its role; the one started without --metrics has none.
    assert m[("llamacpp:prompt_tokens_total", frozenset({("role", "planner")}))] == 7
    assert ("llamacpp:prompt_tokens_total", frozenset({("role", "writer")})) not in m
