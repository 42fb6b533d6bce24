"""The gateway as users run it (uvicorn subprocess) against real fake upstreams."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import CLIENT_KEY, ROOT, GatewayProcess, proxy_config, wait_until
from tests.fakes import FakeUpstream, free_port

Up = Callable[..., FakeUpstream]
Gw = Callable[..., GatewayProcess]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl binary (apt-get install curl)")
def test_guide_quick_start_commands_verbatim(upstreams: Up, tmp_path: Path) -> None:
    """Step 3's command and step 4's two curls, character for character, with configs/models.yaml."""
    for port in (8000, 8011, 8012):
        assert _port_free(port), f"port {port} is busy; the guide's quick start needs it"
    upstreams("planner", port=8011)
    upstreams("writer", port=8012)
    with (tmp_path / "gw.log").open("wb") as log:
        proc = subprocess.Popen(
            "ROLE_MESH_CONFIG=configs/models.yaml uvicorn rolemesh_gateway.main:app --host 127.0.0.1 --port 8000",  # noqa: E501
            shell=True,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"},
        )
    try:
        wait_until(lambda: httpx.get("http://127.0.0.1:8000/ready").status_code == 200, 20, "gateway")
        models = subprocess.run(
            """curl -sS http://127.0.0.1:8000/v1/models \\
-H 'X-Api-Key: change-me-client-key'""",
            shell=True,
            capture_output=True,
            text=True,
            check=True,
        )
        listed = json.loads(models.stdout)
        assert sorted(m["id"] for m in listed["data"]) == ["planner", "writer"]
        chat = subprocess.run(
            """curl -sS -X POST http://127.0.0.1:8000/v1/chat/completions \\
-H 'Content-Type: application/json' \\
-H 'X-Api-Key: change-me-client-key' \\
-d '{
"model": "planner",
"messages": [{"role":"user","content":"Say hello in 3 words."}]
}'""",
            shell=True,
            capture_output=True,
            text=True,
            check=True,
        )
        answer = json.loads(chat.stdout)
        assert answer["choices"][0]["message"]["content"] == "hello from planner"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def test_openai_client_plain_and_incremental_stream(upstreams: Up, gateway: Gw) -> None:
    up = upstreams("writer", chunks=5, chunk_interval_s=0.3)
    gw = gateway(proxy_config(writer=up.url))
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key=CLIENT_KEY, max_retries=0) as client:
        _chat_and_stream(client)


def _chat_and_stream(client: openai.OpenAI) -> None:

    assert [m.id for m in client.models.list()] == ["writer"]
    assert client.models.retrieve("writer").id == "writer"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    done = client.chat.completions.create(model="writer", messages=[{"role": "user", "content": "hi"}])
    assert done.choices[0].message.content == "hello from writer"

    stream = client.chat.completions.create(
        model="writer", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    arrivals: list[float] = []
    texts: list[str] = []
    for chunk in stream:
        arrivals.append(time.monotonic())
        if chunk.choices and chunk.choices[0].delta.content:
            texts.append(chunk.choices[0].delta.content)
    assert texts == ["t0 ", "t1 ", "t2 ", "t3 ", "t4 "]
    # The upstream spends 1.5 s sending; the first chunk must arrive long before the last.
    assert arrivals[-1] - arrivals[0] > 1.0


def test_bearer_auth_and_headers_forwarded(upstreams: Up, gateway: Gw) -> None:
    up = upstreams("planner")
    gw = gateway(proxy_config(planner=up.url))
    r = httpx.post(
        f"{gw.url}/v1/chat/completions?x=1",
        headers={"Authorization": f"Bearer {CLIENT_KEY}", "X-Request-ID": "req-42", "X-Custom": "kept"},
        json={"model": "planner", "messages": []},
    )
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "req-42"
    assert r.headers["x-upstream"] == "planner"
    seen = up.seen[-1]
    lower = {k.lower(): v for k, v in seen.headers.items()}
    assert "authorization" not in lower and "x-api-key" not in lower
    assert lower["x-custom"] == "kept" and lower["x-request-id"] == "req-42"
    assert lower["host"] == up.url.removeprefix("http://")
    assert seen.path == "/v1/chat/completions?x=1"
    r = httpx.post(
        f"{gw.url}/v1/chat/completions", headers={"X-Api-Key": CLIENT_KEY}, json={"model": "planner"}
    )
    generated = r.headers["x-request-id"]
    assert generated and up.seen[-1].headers["X-Request-ID"] == generated
    again = httpx.post(f"{gw.url}/v1/chat/completions", headers={"X-Api-Key": CLIENT_KEY}, json={})
    assert again.headers["x-request-id"] != generated  # unique per request


def test_completions_and_embeddings_routes(upstreams: Up, gateway: Gw) -> None:
    up = upstreams("planner")
    gw = gateway(proxy_config(planner=up.url))
    with gw.client() as c:
        assert c.post("/v1/completions", json={"model": "planner", "prompt": "x"}).status_code == 200
        emb = c.post("/v1/embeddings", json={"input": "x"})  # no model: default_model
        assert emb.json()["data"][0]["embedding"] == [0.1, 0.2]
    assert [s.path for s in up.seen] == ["/v1/completions", "/v1/embeddings"]


def test_probes_track_upstream_down_and_back(upstreams: Up, gateway: Gw) -> None:
    planner = upstreams("planner")
    writer = upstreams("writer")
    gw = gateway(proxy_config(planner=planner.url, writer=writer.url))
    with gw.client() as c:
        _down_and_back(gw, c, planner, upstreams)


def _down_and_back(gw: GatewayProcess, c: httpx.Client, planner: FakeUpstream, upstreams: Up) -> None:
    assert sorted(m["id"] for m in c.get("/v1/models").json()["data"]) == ["planner", "writer"]
    port = planner.port
    planner.stop()

    def planner_gone() -> bool:
        body = c.get("/v1/models").json()
        return [m["id"] for m in body["data"]] == ["writer"] and body["rolemesh"]["unavailable_models"] == [
            "planner"
        ]

    wait_until(planner_gone, 5, "planner to leave /v1/models")
    ready = httpx.get(f"{gw.url}/ready")
    assert ready.status_code == 503 and "planner" in ready.text
    assert httpx.get(f"{gw.url}/health").status_code == 200
    upstreams("planner", port=port)
    wait_until(lambda: httpx.get(f"{gw.url}/ready").status_code == 200, 5, "/ready back to 200")
    assert len(c.get("/v1/models").json()["data"]) == 2


def _assert_openai_error(r: httpx.Response, status: int) -> dict[str, object]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code", "param"}
    assert err["message"]
    return err  # type: ignore[no-any-return]


def test_error_statuses_are_openai_shaped(upstreams: Up, gateway: Gw) -> None:
    slow = upstreams("slow", delay_s=3)
    dead_port = free_port()
    cfg = proxy_config(ok=slow.url, dead=f"http://127.0.0.1:{dead_port}")
    cfg["timeouts"] = {"first_byte_s": 0.5}
    cfg["limits"] = {"max_body_bytes": 1000}
    gw = gateway(cfg)
    url = f"{gw.url}/v1/chat/completions"
    _assert_openai_error(httpx.post(url, json={"model": "ok"}), 401)
    _assert_openai_error(httpx.post(url, json={"model": "ok"}, headers={"X-Api-Key": "wrong"}), 401)
    _assert_openai_error(httpx.post(url, json={"model": "ok"}, headers={"Authorization": "Bearer nope"}), 401)
    with gw.client() as c:
        _client_errors(c)


def _client_errors(c: httpx.Client) -> None:
    assert (
        _assert_openai_error(c.post("/v1/chat/completions", json={"model": "nope"}), 404)["param"] == "model"
    )
    _assert_openai_error(c.post("/v1/chat/completions", content=b"{not json"), 400)
    _assert_openai_error(c.post("/v1/chat/completions", content=b"[1,2]"), 400)
    _assert_openai_error(c.post("/v1/chat/completions", json={"model": 5}), 400)
    _assert_openai_error(c.post("/v1/chat/completions", json={"model": "dead"}), 502)
    _assert_openai_error(c.post("/v1/chat/completions", json={"model": "ok"}), 504)
    _assert_openai_error(c.get("/v1/nothing"), 404)
    _assert_openai_error(c.get("/v1/chat/completions"), 405)


def test_declared_oversized_body_refused_without_reading(gateway: Gw, upstreams: Up) -> None:
    up = upstreams("planner")
    cfg = proxy_config(planner=up.url)
    cfg["limits"] = {"max_body_bytes": 1000}
    gw = gateway(cfg)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        # Declare 10 MB, send only the head: the answer must come without the body.
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Api-Key: "
            + CLIENT_KEY.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n\r\n"
        )
        head = b""
        while b"request_too_large" not in head:
            part = s.recv(65536)
            if not part:
                break
            head += part
    assert head.startswith(b"HTTP/1.1 413"), head
    assert b'"code":"request_too_large"' in head
    assert up.seen == []


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        (
            "version: 1\ndefault_model: p\nmodels:\n  p: {type: proxy, proxy_url: 'http://x:1', bogus: 1}\n",
            "models.p.bogus: unknown key; allowed here: type, openai_model_name, proxy_url",
        ),
        (
            "version: 1\ndefault_model: p\nmodels:\n  p: {type: proxy, proxy_url: 'file:///etc/passwd'}\n",
            "models.p.proxy_url: 'file:///etc/passwd' must be an http:// or https:// URL",
        ),
    ],
)
def test_bad_config_stops_uvicorn_and_cli_before_listening(
    tmp_path: Path, yaml_text: str, expected: str
) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    port = free_port()
    env = {"ROLE_MESH_CONFIG": str(cfg), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    uv = subprocess.run(
        [sys.executable, "-m", "uvicorn", "rolemesh_gateway.main:app", "--port", str(port)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    cli = subprocess.run(
        [sys.executable, "-m", "rolemesh_gateway.gateway.cli", "--config", str(cfg), "--port", str(port)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    for result in (uv, cli):
        assert result.returncode != 0
        lines = [ln for ln in result.stderr.splitlines() if "config error" in ln]
        assert len(lines) == 1 and expected in lines[0], result.stderr
        assert "Uvicorn running" not in result.stderr


def test_client_disconnect_cancels_upstream_request(upstreams: Up, gateway: Gw) -> None:
    up = upstreams("writer", chunks=50, chunk_interval_s=0.1, delay_s=0.0)
    gw = gateway(proxy_config(writer=up.url))
    with (
        gw.client() as c,
        c.stream("POST", "/v1/chat/completions", json={"model": "writer", "stream": True}) as r,
    ):
        for n, _ in enumerate(r.iter_lines()):
            if n == 2:
                break
    wait_until(lambda: up.cancelled == 1, 1.0, "the upstream stream to be cancelled")
    up.delay_s = 5
    with gw.client() as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/chat/completions", json={"model": "writer"}, timeout=0.3)
    wait_until(lambda: up.cancelled == 2, 1.0, "the upstream request to be cancelled")
    assert "Traceback" not in gw.log_text()


def test_stream_silent_for_idle_s_ends_with_sse_error(upstreams: Up, gateway: Gw) -> None:
    up = upstreams("writer", chunks=3, chunk_interval_s=6)
    cfg = proxy_config(writer=up.url)
    cfg["timeouts"] = {"first_byte_s": 10, "idle_s": 0.5}
    gw = gateway(cfg)
    events: list[str] = []
    t0 = time.monotonic()
    with gw.client() as c, c.stream("POST", "/v1/chat/completions", json={"stream": True}) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line]
    elapsed = time.monotonic() - t0
    # One chunk, then silence: the idle limit (not first_byte_s, not the upstream's 6 s) ends it.
    assert len(events) == 2 and '"t0 "' in events[0]
    assert events[1].startswith('data: {"error"') and "upstream_timeout" in events[1]
    assert 0.4 < elapsed < 4.0


def test_large_bodies_flow_through_and_a_cut_body_never_looks_whole(upstreams: Up, gateway: Gw) -> None:
    size = 12 * 1024 * 1024  # over the 4 MiB the gateway reads whole before answering
    up = upstreams("writer", big_body=size, chunk_interval_s=4.0)
    gw = gateway(proxy_config(writer=up.url))
    with gw.client() as c:
        t0 = time.monotonic()
        with c.stream("POST", "/v1/embeddings", json={"model": "writer", "input": "x"}) as r:
            assert r.status_code == 200 and r.headers["content-length"] == str(size)
            got = 0
            first_at = 0.0
            for chunk in r.iter_bytes():
                first_at = first_at or time.monotonic() - t0
                got += len(chunk)
        # The first half reached the client while the upstream was still pausing (4 s).
        assert first_at < 3.0 and got == size
        up.cut_body = True
        with (
            pytest.raises(httpx.RemoteProtocolError),
            c.stream("POST", "/v1/embeddings", json={"model": "writer", "input": "x"}) as r,
        ):
            for _ in r.iter_bytes():
                pass
        up.big_body, up.cut_body = 0, False
        assert c.post("/v1/embeddings", json={"model": "writer", "input": "x"}).status_code == 200
