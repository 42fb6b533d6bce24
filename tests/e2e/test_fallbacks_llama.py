"""Fallbacks with the real llama-server: a prompt too long for a ``-c 256`` role is served by
a larger-context alias, streamed and not; an alias with no node is served by its fallback."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai

from tests.agents import AgentProcess
from tests.conftest import CLIENT_KEY, NODE_KEY, GatewayProcess, wait_until

Gw = Callable[..., GatewayProcess]
Ag = Callable[..., AgentProcess]
ARGS = ["-n", "8", "-t", "1", "--chat-template", "chatml"]
#: About 600 tokens: too long for -c 256, fine for -c 2048.
LONG = [{"role": "user", "content": "hello world " * 300}]
SHORT = [{"role": "user", "content": "hi"}]


def test_too_long_prompts_and_missing_nodes_fall_back(
    gateway: Gw, agent: Ag, llama_server_bin: str, tiny_model: Path
) -> None:
    gw = gateway(
        {
            "version": 1,
            "default_model": "small",
            "auth": {"client_api_keys": [CLIENT_KEY], "node_api_keys": [NODE_KEY]},
            "models": {
                "small": {"type": "discovered", "role": "small", "fallbacks": ["large"]},
                "large": {"type": "discovered", "role": "large"},
                "planner": {"type": "discovered", "role": "planner", "fallbacks": ["large"]},
            },
        }
    )

    def spec(ctx: str) -> dict[str, Any]:
        return {"model": str(tiny_model), "binary": llama_server_bin, "args": ["-c", ctx, *ARGS]}

    a = agent(
        {
            "node_id": "fb-node",
            "gateway_url": gw.url,
            "node_key": NODE_KEY,
            "heartbeat_interval_s": 0.5,
            "roles": {"small": {"llama_server": spec("256")}, "large": {"llama_server": spec("2048")}},
        }
    )
    a.wait_ready(60)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=30)
    wait_until(
        lambda: httpx.get(f"{gw.url}/v1/models", headers={"X-Api-Key": CLIENT_KEY}).json()["rolemesh"][
            "aliases"
        ]["small"]["available"],
        10,
        "the node registered",
    )

    # A short prompt: small serves it itself.
    raw = client.chat.completions.with_raw_response.create(model="small", messages=SHORT, max_tokens=2)  # type: ignore[arg-type]
    assert raw.headers["x-rolemesh-alias"] == "small"

    # Too long for small's 256-token context: large answers, plain and streamed.
    raw = client.chat.completions.with_raw_response.create(model="small", messages=LONG, max_tokens=2)  # type: ignore[arg-type]
    assert raw.headers["x-rolemesh-alias"] == "large"
    answer = raw.parse()
    assert answer.usage is not None and answer.usage.prompt_tokens > 256
    with client.chat.completions.with_streaming_response.create(
        model="small",
        messages=LONG,  # type: ignore[arg-type]
        max_tokens=4,
        stream=True,
        extra_body={"ignore_eos": True},
    ) as resp:
        assert resp.headers["x-rolemesh-alias"] == "large"
        chunks = list(resp.parse())
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2

    # Without a fallback, the client gets llama-server's own 400 as it came.
    try:
        client.chat.completions.create(model="large", messages=[{"role": "user", "content": "x " * 3000}])
        raise AssertionError("a prompt too long for every alias must be refused")
    except openai.BadRequestError as exc:
        assert "exceeds the available context size" in str(exc)

    # No node serves planner: large answers for it.
    raw = client.chat.completions.with_raw_response.create(model="planner", messages=SHORT, max_tokens=2)  # type: ignore[arg-type]
    assert raw.headers["x-rolemesh-alias"] == "large"
    with gw.client() as c:
        metrics = c.get("/metrics").text
    assert 'rolemesh_fallbacks_total{from="small",reason="context_too_long",to="large"} 2.0' in metrics
    assert 'rolemesh_fallbacks_total{from="planner",reason="no_upstream",to="large"} 1.0' in metrics
