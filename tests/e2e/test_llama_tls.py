"""The real llama-server behind an agent, with mutual TLS between the agent and the gateway.

The certificates come from scripts/make_certs.sh; the client is the official ``openai`` SDK over
https; the gateway checks both the node key and the node's certificate, and that the agent's
server certificate names the node.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import openai

from tests.conftest import CLIENT_KEY, wait_until
from tests.test_mtls import (
    TlsService,
    agent_config,
    certs,
    gateway_config,
    nodes,
    procs,
    start_agent,
    start_gateway,
    trust,
)

__all__ = ["certs", "procs"]  # fixtures used here

LLAMA_ARGS = ["-c", "512", "-n", "32", "-t", "1", "--chat-template", "chatml"]


def test_a_streamed_chat_from_a_real_llama_server_over_mutual_tls(
    tmp_path: Path, certs: Path, procs: list[TlsService], llama_server_bin: str, tiny_model: Path
) -> None:
    gw = start_gateway(procs, tmp_path, certs, gateway_config(certs))
    cfg = agent_config(gw, "gpu-box-1", certs, "http://127.0.0.1:9", certs / "ca.crt")
    spec = {"model": str(tiny_model), "binary": llama_server_bin, "args": LLAMA_ARGS}
    cfg["roles"] = {"writer": {"llama_server": spec}}
    start_agent(procs, tmp_path, cfg, certs / "ca.crt")
    wait_until(lambda: [n["node_id"] for n in nodes(gw)] == ["gpu-box-1"], 90, "gpu-box-1 registered")

    with httpx.Client(verify=trust(certs / "ca.crt")) as http:
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=CLIENT_KEY, http_client=http, max_retries=0)
        stream = client.chat.completions.create(
            model="writer",
            messages=[{"role": "user", "content": "Say hello in 3 words."}],
            max_tokens=8,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        chunks = [c for c in stream if c.choices]
    assert sum(1 for c in chunks if c.choices[0].delta.content) >= 4
    assert chunks[-1].choices[0].finish_reason == "length"
