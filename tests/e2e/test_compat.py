"""The same calls, with the official SDKs, against a real llama-server three ways, and the same answers.

- **direct**: llama-server itself (a chat server, and one started with ``--embeddings``);
- **proxy**: the gateway's ``type: proxy`` aliases in front of those same servers;
- **discovered**: the gateway's ``type: discovered`` aliases, through node agents whose own
  llama-servers run the same model with the same arguments (two nodes serve ``planner``, so a
  retry on "the other node" would show).

Greedy sampling (temperature 0) makes the text of every path the same, so the assertions
compare status, shape and content, not just "it worked". Errors that a client causes (an image
sent to a text model, embeddings asked of a chat server) must come back with llama-server's own
status and message, and must not cost the node its place.
"""

from __future__ import annotations

import concurrent.futures
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.agents import AgentProcess
from tests.conftest import CLIENT_KEY, NODE_KEY, GatewayProcess, wait_until
from tests.fakes import free_port

CHAT_ARGS = ["-c", "1024", "--parallel", "2", "-t", "1"]
EMBED_ARGS = ["-c", "512", "--parallel", "1", "-t", "1", "--embeddings", "--pooling", "mean"]
HELLO = [{"role": "user", "content": "Say hello in 3 words."}]
GREEDY: dict[str, Any] = {"temperature": 0, "seed": 42}
IMAGE = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]


class LlamaServer:
    """A llama-server of our own (the "direct" target), on a free loopback port."""

    def __init__(self, binary: str, model: Path, alias: str, args: list[str], log: Path) -> None:
        self.port = free_port()
        argv = [binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port), "--alias", alias]
        with log.open("wb") as out:
            self.proc = subprocess.Popen([*argv, *args], stdout=out, stderr=subprocess.STDOUT)
        wait_until(lambda: httpx.get(f"{self.url}/health").status_code == 200, 60, f"llama-server {alias}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@dataclass
class Targets:
    """Base URL and model name of each way to reach a chat and an embeddings model."""

    gateway: GatewayProcess
    agents: list[AgentProcess]
    direct_chat: LlamaServer
    direct_embed: LlamaServer

    def chat(self, how: str) -> tuple[str, str, str]:
        """``(base URL, model, key)`` for the chat model reached ``how``."""
        if how == "direct":
            return self.direct_chat.url, "direct", "no-key-needed"
        return self.gateway.url, {"proxy": "direct", "discovered": "planner"}[how], CLIENT_KEY

    def embed(self, how: str) -> tuple[str, str, str]:
        if how == "direct":
            return self.direct_embed.url, "embed", "no-key-needed"
        return self.gateway.url, {"proxy": "embed", "discovered": "embedder"}[how], CLIENT_KEY

    def openai(self, base: str, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)

    def node_states(self) -> dict[str, str]:
        with self.gateway.client() as c:
            nodes = c.get("/v1/nodes").json()["data"]
        return {n["node_id"]: n["state"] for n in nodes}


WAYS = ["direct", "proxy", "discovered"]


@pytest.fixture(scope="module")
def targets(
    tmp_path_factory: pytest.TempPathFactory, llama_server_bin: str, tiny_model: Path
) -> Iterator[Targets]:
    tmp = tmp_path_factory.mktemp("compat")
    chat = LlamaServer(llama_server_bin, tiny_model, "direct", CHAT_ARGS, tmp / "direct.log")
    embed = LlamaServer(llama_server_bin, tiny_model, "embed", EMBED_ARGS, tmp / "embed.log")
    config = {
        "version": 1,
        "default_model": "planner",
        "auth": {"client_api_keys": [CLIENT_KEY], "node_api_keys": [NODE_KEY]},
        "probes": {"interval_s": 1, "timeout_s": 2},
        "models": {
            "planner": {"type": "discovered", "role": "planner"},
            "embedder": {"type": "discovered", "role": "embedder"},
            "direct": {"type": "proxy", "proxy_url": chat.url},
            "embed": {"type": "proxy", "proxy_url": embed.url},
        },
    }
    gw = GatewayProcess(config, tmp).start()
    spec = {"model": str(tiny_model), "binary": llama_server_bin}
    planner = {"llama_server": {**spec, "args": CHAT_ARGS}}
    roles = [
        {"planner": planner, "embedder": {"llama_server": {**spec, "args": EMBED_ARGS}}},
        {"planner": planner},
    ]
    agents = [
        AgentProcess(
            {
                "node_id": f"compat-node-{i}",
                "gateway_url": gw.url,
                "node_key": NODE_KEY,
                "heartbeat_interval_s": 1,
                "roles": node_roles,
            },
            tmp,
        ).start()
        for i, node_roles in enumerate(roles, 1)
    ]
    t = Targets(gw, agents, chat, embed)
    try:
        for agent in agents:
            agent.wait_ready(60)

        def all_listed() -> bool:
            with gw.client() as c:
                listed = {m["id"] for m in c.get("/v1/models").json()["data"]}
            return listed == {"planner", "embedder", "direct", "embed"}

        wait_until(all_listed, 20, "every alias available")
        yield t
    finally:
        for agent in agents:
            agent.stop()
        gw.stop()
        chat.stop()
        embed.stop()


# -- the openai SDK ------------------------------------------------------------------------------
def answer_text(t: Targets, how: str) -> str:
    base, model, key = t.chat(how)
    r = t.openai(base, key).chat.completions.create(model=model, messages=HELLO, max_tokens=8, **GREEDY)
    assert r.object == "chat.completion" and r.usage is not None and r.usage.completion_tokens == 8
    return r.choices[0].message.content or ""


def test_chat_plain_is_the_same_three_ways(targets: Targets) -> None:
    texts = {how: answer_text(targets, how) for how in WAYS}
    assert texts["direct"] and texts["proxy"] == texts["direct"] == texts["discovered"], texts


def test_chat_stream_with_usage_is_the_same_three_ways(targets: Targets) -> None:
    seen = {}
    for how in WAYS:
        base, model, key = targets.chat(how)
        stream = targets.openai(base, key).chat.completions.create(
            model=model,
            messages=HELLO,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = chunks[-1].usage
        assert usage is not None and usage.completion_tokens == 8 and not chunks[-1].choices
        seen[how] = (len(chunks), text)
    assert seen["proxy"] == seen["direct"] == seen["discovered"], seen


def test_completions_the_same_three_ways(targets: Targets) -> None:
    texts = {}
    for how in WAYS:
        base, model, key = targets.chat(how)
        r = targets.openai(base, key).completions.create(
            model=model, prompt="Once upon", max_tokens=6, **GREEDY
        )
        texts[how] = r.choices[0].text
    assert texts["direct"] and texts["proxy"] == texts["direct"] == texts["discovered"]


def test_embeddings_the_same_three_ways(targets: Targets) -> None:
    vectors = {}
    for how in WAYS:
        base, model, key = targets.embed(how)
        r = targets.openai(base, key).embeddings.create(model=model, input=["hello there", "bye"])
        assert len(r.data) == 2
        vectors[how] = [round(x, 5) for x in r.data[0].embedding[:8]]
    assert vectors["proxy"] == vectors["direct"] == vectors["discovered"]


def test_responses_api_the_same_three_ways(targets: Targets) -> None:
    texts = {}
    for how in WAYS:
        base, model, key = targets.chat(how)
        r = targets.openai(base, key).responses.create(
            model=model, input="Say hello.", max_output_tokens=6, temperature=0
        )
        assert r.object == "response" and r.status == "completed"
        texts[how] = r.output_text
    assert texts["direct"] and texts["proxy"] == texts["direct"] == texts["discovered"]


def test_models_list_and_retrieve_keep_what_llama_server_reports(targets: Targets) -> None:
    direct = targets.openai(*targets.chat("direct")[::2]).models.list().data[0]
    client = targets.openai(targets.gateway.url, CLIENT_KEY)
    listed = {m.id: m for m in client.models.list()}
    assert set(listed) == {"planner", "embedder", "direct", "embed"}
    direct_meta = direct.model_extra["meta"] if direct.model_extra else None
    assert direct_meta and direct_meta["n_ctx_train"] == 2048
    for name in ("direct", "planner"):  # learned from a probe, and from the agent's registration
        extra = listed[name].model_extra or {}
        assert extra.get("meta", {}).get("n_ctx_train") == direct_meta["n_ctx_train"], (name, extra)
        assert listed[name].created > 1_700_000_000  # a real time
    got = client.models.retrieve("planner")
    assert got.id == "planner" and (got.model_extra or {}).get("meta", {}).get("n_params")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


# -- the anthropic SDK ---------------------------------------------------------------------------
def test_anthropic_messages_plain_and_stream_the_same_three_ways(targets: Targets) -> None:
    plain, streamed = {}, {}
    for how in WAYS:
        base, model, key = targets.chat(how)
        client = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0, timeout=60)
        message = client.messages.create(
            model=model, max_tokens=6, messages=HELLO, extra_body={"temperature": 0}
        )
        assert message.type == "message" and message.stop_reason == "max_tokens"
        plain[how] = "".join(b.text for b in message.content if b.type == "text")
        with client.messages.stream(
            model=model, max_tokens=6, messages=HELLO, extra_body={"temperature": 0}
        ) as stream:
            streamed[how] = "".join(stream.text_stream)
    assert plain["direct"] and plain["proxy"] == plain["direct"] == plain["discovered"]
    assert streamed["proxy"] == streamed["direct"] == streamed["discovered"] == plain["direct"]


def test_anthropic_error_shape_for_the_gateways_own_errors(targets: Targets) -> None:
    client = anthropic.Anthropic(base_url=targets.gateway.url, api_key=CLIENT_KEY, max_retries=0)
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.create(model="claude-nope", max_tokens=4, messages=HELLO)
    assert info.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": info.value.body["error"]["message"]},
    }  # type: ignore[index]
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=targets.gateway.url, api_key="wrong", max_retries=0).messages.create(
            model="planner", max_tokens=4, messages=HELLO
        )


# -- llama.cpp's own endpoints ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/tokenize", {"content": "hello world"}),
        ("/v1/rerank", {"query": "a", "documents": ["b", "c"]}),  # 501 without --reranking: the same 501
        ("/infill", {"input_prefix": "def f(", "input_suffix": "):", "n_predict": 4}),  # 501: no FIM tokens
        ("/detokenize", {"tokens": [22172, 3186]}),
        ("/apply-template", {"messages": HELLO}),
    ],
)
def test_llama_cpp_endpoints_answer_as_direct(targets: Targets, path: str, body: dict[str, Any]) -> None:
    answers = {}
    for how in WAYS:
        base, model, key = targets.chat(how)
        r = httpx.post(f"{base}{path}", json={**body, "model": model}, headers={"X-Api-Key": key}, timeout=30)
        answers[how] = (r.status_code, r.json())
    assert answers["proxy"] == answers["direct"] == answers["discovered"], answers


def test_props_by_model(targets: Targets) -> None:
    with targets.gateway.client() as c:
        r = c.get("/props", params={"model": "planner"})
    assert r.status_code == 200 and "default_generation_settings" in r.json()


# -- a client's errors are the client's ---------------------------------------------------------------
@pytest.mark.parametrize("kind", ["image to a text model", "embeddings from a chat server"])
def test_client_errors_come_back_as_llama_server_said_and_cost_the_node_nothing(
    targets: Targets, kind: str
) -> None:
    answers = {}
    for how in WAYS:
        base, model, key = targets.chat(how)
        if kind == "image to a text model":
            body = {"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": IMAGE}]}
            r = httpx.post(f"{base}/v1/chat/completions", json=body, headers={"X-Api-Key": key}, timeout=30)
        else:
            r = httpx.post(
                f"{base}/v1/embeddings", json={"model": model, "input": "hi"}, headers={"X-Api-Key": key}
            )
        answers[how] = (r.status_code, r.json()["error"]["message"])
    assert answers["direct"][0] in (500, 501)
    assert answers["proxy"] == answers["direct"] == answers["discovered"], answers
    # The SDK retries such an answer (max_retries=2): three attempts, and still nobody is punished.
    base, model, key = targets.chat("discovered")
    sdk = openai.OpenAI(base_url=f"{base}/v1", api_key=key, timeout=30)
    with pytest.raises(openai.APIStatusError) as info:
        if kind == "image to a text model":
            sdk.chat.completions.create(
                model=model, max_tokens=2, messages=[{"role": "user", "content": IMAGE}]
            )  # type: ignore[list-item]
        else:
            sdk.embeddings.create(model=model, input="hi")
    assert info.value.status_code == answers["direct"][0]
    assert set(targets.node_states().values()) == {"fresh"}
    assert answer_text(targets, "discovered")  # and it serves everyone
    assert httpx.get(f"{targets.gateway.url}/ready").status_code == 200


def test_fifty_bad_requests_in_a_second_eject_nothing(targets: Targets) -> None:
    base, model, key = targets.chat("discovered")
    bad = {"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": IMAGE}]}

    def one_bad(_: int) -> int:
        return httpx.post(
            f"{base}/v1/chat/completions", json=bad, headers={"X-Api-Key": key}, timeout=30
        ).status_code

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(51) as pool:
        good = pool.submit(answer_text, targets, "discovered")  # another client, at the same time
        statuses = list(pool.map(one_bad, range(50)))
        assert good.result(timeout=60)
    assert time.monotonic() - started < 30
    assert statuses == [500] * 50
    assert targets.node_states() == {"compat-node-1": "fresh", "compat-node-2": "fresh"}
    assert answer_text(targets, "discovered") == answer_text(targets, "direct")
