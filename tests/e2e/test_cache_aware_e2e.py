"""cache_aware on real llama-servers: a conversation's next turn finds its prompt cached.

Two node agents, each with its own real llama-server serving ``planner`` from the tiny model,
behind one gateway whose ``planner`` alias uses ``strategy: cache_aware``. Each conversation's
turns must all land on one node, and from the second turn on llama-server must report most of
the prompt as cached (``usage.prompt_tokens_details.cached_tokens``), which the gateway also
counts in ``rolemesh_prompt_cache_tokens_total``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.agents import AgentProcess
from tests.conftest import CLIENT_KEY, NODE_KEY, GatewayProcess, wait_until

LLAMA_ARGS = ["-c", "2048", "-t", "1", "--chat-template", "chatml"]


def gateway_config() -> dict[str, Any]:
    return {
        "version": 1,
        "default_model": "planner",
        "auth": {"client_api_keys": [CLIENT_KEY], "node_api_keys": [NODE_KEY]},
        "models": {"planner": {"type": "discovered", "role": "planner", "strategy": "cache_aware"}},
    }


def agent_config(node_id: str, gateway_url: str, binary: str, model: Path) -> dict[str, Any]:
    spec = {"model": str(model), "binary": binary, "args": LLAMA_ARGS}
    return {
        "node_id": node_id,
        "gateway_url": gateway_url,
        "node_key": NODE_KEY,
        "heartbeat_interval_s": 1.0,
        "probes": {"interval_s": 1, "timeout_s": 5},
        "roles": {"planner": {"llama_server": spec}},
    }


def served_by(gw: GatewayProcess) -> Counter[str]:
    """Successful attempts per node, from the gateway's /metrics."""
    with gw.client() as c:
        text = c.get("/metrics").text
    out: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "rolemesh_upstream_attempts_total" and s.labels.get("outcome") == "ok":
                out[s.labels["node"]] += int(s.value)
    return out


def cache_tokens(gw: GatewayProcess) -> dict[str, float]:
    with gw.client() as c:
        text = c.get("/metrics").text
    return {
        s.labels["kind"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "rolemesh_prompt_cache_tokens_total"
    }


def test_each_turn_returns_to_the_node_that_holds_the_conversation(
    gateway: Callable[..., GatewayProcess],
    agent: Callable[..., AgentProcess],
    llama_server_bin: str,
    tiny_model: Path,
) -> None:
    gw = gateway(gateway_config())
    agents = [agent(agent_config(f"cache-{i}", gw.url, llama_server_bin, tiny_model)) for i in (1, 2)]
    for a in agents:
        a.wait_ready(60)

    def both_fresh() -> bool:
        with gw.client() as c:
            nodes = c.get("/v1/nodes").json()["data"]
        return sum(1 for n in nodes if n["status"] == "fresh") == 2

    wait_until(both_fresh, 15, "both nodes fresh")
    conversations = {
        name: [{"role": "system", "content": f"You are the {name} agent. " + f"Rule {name}: exact. " * 60}]
        for name in ("alpha", "beta", "gamma")  # odd: round robin would move each one
    }
    homes: dict[str, str] = {}
    with httpx.Client(
        base_url=f"{gw.url}/v1", headers={"Authorization": f"Bearer {CLIENT_KEY}"}, timeout=60
    ) as client:
        talk(client, gw, conversations, homes)
    assert set(homes.values()) == {"cache-1", "cache-2"}  # the conversations were spread
    seen = cache_tokens(gw)
    assert seen["cached"] > seen["processed"] > 0


def talk(
    client: httpx.Client, gw: GatewayProcess, conversations: dict[str, list[Any]], homes: dict[str, str]
) -> None:
    """Three turns of each conversation, in turn; each must stay on its node and hit its cache."""
    for turn in range(3):
        for name, messages in conversations.items():
            messages.append({"role": "user", "content": f"Turn {turn}: what next for {name}?"})
            before = served_by(gw)
            r = client.post("/chat/completions", json={"messages": messages, "max_tokens": 4})
            assert r.status_code == 200, r.text
            answer = r.json()
            (node,) = (served_by(gw) - before).keys()
            homes.setdefault(name, node)
            assert node == homes[name], (
                f"{name} turn {turn} went to {node}, its earlier turns to {homes[name]}"
            )
            usage = answer["usage"]
            cached = usage["prompt_tokens_details"]["cached_tokens"]
            if turn == 0:
                assert cached < usage["prompt_tokens"] / 2  # nothing of this conversation was cached
            else:  # all of the previous turn (system prompt and history) came from the cache
                assert cached >= 0.8 * usage["prompt_tokens"], usage
            messages.append(answer["choices"][0]["message"])
