"""TLS and mutual TLS between the real programs, with certificates made by scripts/make_certs.sh.

``rolemesh-gateway`` and ``rolemesh-node-agent`` run as subprocesses exactly as the README's LAN
walkthrough runs them; an inference client uses the real ``openai`` SDK over https. Refusals
are checked on both sides: what the agent logs, and what the gateway logs.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.conftest import CLIENT_KEY, NODE_KEY, ROOT, ServiceProcess, wait_until
from tests.fakes import FakeUpstream, free_port

BIN = Path(sys.executable).parent
MAKE_CERTS = ROOT / "scripts" / "make_certs.sh"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CA with the gateway, gpu-box-1 and gpu-box-2, an expired gpu-box-3 from the same CA,
    and in ``other/`` a second CA with its own gpu-box-1."""
    d = tmp_path_factory.mktemp("certs")
    run = [str(MAKE_CERTS), "-o"]
    subprocess.run([*run, str(d), "gpu-box-1", "gpu-box-2"], check=True, capture_output=True)
    subprocess.run([*run, str(d), "--expired", "gpu-box-3"], check=True, capture_output=True)
    subprocess.run([*run, str(d / "other"), "gpu-box-1"], check=True, capture_output=True)
    return d


def trust(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


class TlsService(ServiceProcess):
    """A program serving https; ready when its /health answers over TLS."""

    def __init__(self, name: str, port: int, tmp: Path, probe: ssl.SSLContext) -> None:
        self.name = name
        self.probe = probe
        super().__init__(port, tmp, {**os.environ})

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _up(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}: {self.log_text()}")
        return httpx.get(f"{self.url}/health", timeout=1, verify=self.probe).status_code == 200

    def start(self, argv: list[str]) -> TlsService:
        self._launch(argv, wait=True)
        return self

    def wait_log(self, text: str, timeout: float = 10) -> str:
        wait_until(lambda: text in self.log_text(), timeout, f"{text!r} in {self.log_path}")
        return self.log_text()


def gateway_config(certs: Path, identity: str = "both", **tls: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "default_model": "writer",
        "auth": {"client_api_keys": [CLIENT_KEY], "node_api_keys": [NODE_KEY]},
        "nodes": {"identity": identity, "verify_server_names": True, "stale_after_s": 5},
        "tls": {
            "client_ca_file": str(certs / "ca.crt"),
            "client_certs": "optional",  # inference clients come without one, nodes with one
            "ca_file": str(certs / "ca.crt"),
            "client_cert_file": str(certs / "gateway.crt"),
            "client_key_file": str(certs / "gateway.key"),
            **tls,
        },
        "models": {"writer": {"type": "discovered", "role": "writer"}},
    }


def start_gateway(procs: list[TlsService], tmp: Path, certs: Path, config: dict[str, Any]) -> TlsService:
    """``rolemesh-gateway`` with the serving certificate given as options (the rest in the file)."""
    port = free_port()
    path = tmp / f"gateway-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    gw = TlsService("gateway", port, tmp, trust(certs / "ca.crt"))
    procs.append(gw)
    argv = [str(BIN / "rolemesh-gateway"), "--config", str(path), "--port", str(port)]
    argv += ["--tls-cert-file", str(certs / "gateway.crt"), "--tls-key-file", str(certs / "gateway.key")]
    return gw.start(argv)


def agent_config(gw: TlsService, node: str, files: Path, upstream: str, ca: Path) -> dict[str, Any]:
    return {
        "node_id": node,
        "gateway_url": gw.url,
        "node_key": NODE_KEY,
        "port": free_port(),
        "heartbeat_interval_s": 0.5,
        "probes": {"interval_s": 0.2, "timeout_s": 1},
        "tls": {
            "cert_file": str(files / f"{node}.crt"),
            "key_file": str(files / f"{node}.key"),
            "client_ca_file": str(ca),
            "ca_file": str(ca),
            "client_cert_file": str(files / f"{node}.crt"),
            "client_key_file": str(files / f"{node}.key"),
        },
        "roles": {"writer": {"proxy_url": upstream}},
    }


def start_agent(procs: list[TlsService], tmp: Path, config: dict[str, Any], ca: Path) -> TlsService:
    probe = trust(ca)  # as the gateway calls it: with a certificate, for the node's name
    probe.check_hostname = False
    probe.load_cert_chain(ca.parent / "gateway.crt", ca.parent / "gateway.key")
    agent = TlsService("agent", int(config["port"]), tmp, probe)
    procs.append(agent)
    path = tmp / f"agent-{agent.port}.yaml"
    path.write_text(yaml.safe_dump(config))
    return agent.start([str(BIN / "rolemesh-node-agent"), "--config", str(path)])


@pytest.fixture
def upstream() -> Any:
    up = FakeUpstream("writer").start()
    yield up
    up.stop()


@pytest.fixture
def procs() -> Any:
    started: list[TlsService] = []
    yield started
    for p in started:
        p.stop()


def nodes(gw: TlsService) -> list[dict[str, Any]]:
    r = httpx.get(f"{gw.url}/v1/nodes", headers={"X-Api-Key": CLIENT_KEY}, verify=gw.probe, timeout=5)
    data: list[dict[str, Any]] = r.json()["data"]
    return data


def test_mutual_tls_registers_and_streams_through_the_openai_sdk(
    tmp_path: Path, certs: Path, upstream: FakeUpstream, procs: list[TlsService]
) -> None:
    gw = start_gateway(procs, tmp_path, certs, gateway_config(certs))
    agent = start_agent(
        procs,
        tmp_path,
        agent_config(gw, "gpu-box-1", certs, upstream.url, certs / "ca.crt"),
        certs / "ca.crt",
    )
    wait_until(lambda: [n["node_id"] for n in nodes(gw)] == ["gpu-box-1"], 15, "gpu-box-1 registered")
    assert nodes(gw)[0]["base_url"] == agent.url  # https

    with httpx.Client(verify=trust(certs / "ca.crt")) as http:
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=CLIENT_KEY, http_client=http)
        stream = client.chat.completions.create(
            model="writer", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(parts)
    assert upstream.seen and upstream.seen[-1].body["stream"] is True
    assert "rolemesh-gateway listening on https://127.0.0.1" in gw.log_text()
    assert "rolemesh-node-agent listening on https://127.0.0.1" in agent.log_text()

    # The agent's own port wants a client certificate: a caller without one gets no answer.
    with pytest.raises(httpx.HTTPError):
        httpx.post(f"{agent.url}/v1/chat/completions", verify=trust(certs / "ca.crt"), timeout=5, json={})


def test_an_agent_serves_only_the_certificate_names_it_allows(
    tmp_path: Path, certs: Path, upstream: FakeUpstream, procs: list[TlsService]
) -> None:
    """tls.allowed_client_names: another node's certificate from the same CA, even with the
    node key, cannot use this agent's models; the gateway's can."""
    gw = start_gateway(procs, tmp_path, certs, gateway_config(certs))
    config = agent_config(gw, "gpu-box-1", certs, upstream.url, certs / "ca.crt")
    config["tls"]["allowed_client_names"] = ["localhost"]  # what make_certs.sh's gateway.crt names
    agent = start_agent(procs, tmp_path, config, certs / "ca.crt")
    wait_until(lambda: [n["node_id"] for n in nodes(gw)] == ["gpu-box-1"], 15, "gpu-box-1 registered")
    chat = {"model": "writer", "messages": [{"role": "user", "content": "hi"}]}
    through = httpx.post(
        f"{gw.url}/v1/chat/completions",
        headers={"X-Api-Key": CLIENT_KEY},
        json=chat,
        verify=gw.probe,
        timeout=10,
    )
    assert through.status_code == 200

    other_node = trust(certs / "ca.crt")
    other_node.check_hostname = False
    other_node.load_cert_chain(certs / "gpu-box-2.crt", certs / "gpu-box-2.key")
    seen = len(upstream.seen)
    direct = httpx.post(
        f"{agent.url}/v1/chat/completions",
        headers={"X-RoleMesh-Node-Key": NODE_KEY},
        json=chat,
        verify=other_node,
        timeout=10,
    )
    assert direct.status_code == 403
    assert direct.json()["error"]["message"] == (
        "the client certificate names gpu-box-2; this agent serves only localhost (tls.allowed_client_names)"
    )
    assert len(upstream.seen) == seen  # nothing reached the model


def test_plain_http_to_the_tls_port_fails_fast(tmp_path: Path, certs: Path, procs: list[TlsService]) -> None:
    gw = start_gateway(procs, tmp_path, certs, gateway_config(certs))
    plain = gw.url.replace("https://", "http://")
    start = time.monotonic()
    with pytest.raises(httpx.RemoteProtocolError, match="disconnected without sending a response"):
        httpx.get(f"{plain}/health", timeout=10)
    curl = subprocess.run(["curl", "-sS", f"{plain}/health"], capture_output=True, text=True, timeout=10)
    assert time.monotonic() - start < 3
    assert curl.returncode == 52 and "Empty reply from server" in curl.stderr
    log = gw.wait_log("spoke plain HTTP")
    assert "TLS handshake with 127.0.0.1:" in log
    assert "refused: the client spoke plain HTTP to the HTTPS port" in log


@pytest.mark.parametrize(
    ("case", "agent_says", "gateway_says"),
    [
        (
            "other-ca",
            "refused the TLS connection: tlsv1 alert unknown ca",
            "refused: certificate verify failed: unable to get local issuer certificate",
        ),
        (
            "expired",
            "refused the TLS connection: sslv3 alert certificate expired",
            "refused: certificate verify failed: certificate has expired",
        ),
        (
            "wrong-name",
            "gateway refused registration with HTTP 403: the client certificate names gpu-box-2, "
            "not node 'gpu-box-1'",
            "the client certificate names gpu-box-2, not node 'gpu-box-1'",
        ),
    ],
)
def test_a_node_with_a_bad_certificate_is_refused_at_registration(
    tmp_path: Path,
    certs: Path,
    upstream: FakeUpstream,
    procs: list[TlsService],
    case: str,
    agent_says: str,
    gateway_says: str,
) -> None:
    gw = start_gateway(procs, tmp_path, certs, gateway_config(certs))
    cfg = agent_config(gw, "gpu-box-1", certs, upstream.url, certs / "ca.crt")
    if case == "other-ca":
        files = certs / "other"
    elif case == "expired":
        files = certs
        cfg["node_id"] = "gpu-box-3"
    else:
        files = certs
    name = "gpu-box-2" if case == "wrong-name" else cfg["node_id"]
    for k in ("cert_file", "client_cert_file"):
        cfg["tls"][k] = str(files / f"{name}.crt")
    for k in ("key_file", "client_key_file"):
        cfg["tls"][k] = str(files / f"{name}.key")
    # The agent's own server certificate must pass its own start; serve it with a good one.
    cfg["tls"]["cert_file"] = str(certs / "gpu-box-1.crt")
    cfg["tls"]["key_file"] = str(certs / "gpu-box-1.key")
    agent = start_agent(procs, tmp_path, cfg, certs / "ca.crt")
    agent.wait_log(agent_says)
    gw.wait_log(gateway_says)
    assert nodes(gw) == []


def test_an_agent_given_http_for_a_tls_gateway_says_what_to_fix(
    tmp_path: Path, certs: Path, upstream: FakeUpstream, procs: list[TlsService]
) -> None:
    gw = start_gateway(procs, tmp_path, certs, gateway_config(certs, identity="key"))
    cfg = agent_config(gw, "gpu-box-1", certs, upstream.url, certs / "ca.crt")
    cfg["gateway_url"] = gw.url.replace("https://", "http://")
    agent = start_agent(procs, tmp_path, cfg, certs / "ca.crt")
    log = agent.wait_log("closed the connection without answering")
    assert f"gateway {cfg['gateway_url']} closed the connection without answering" in log
    assert "(if it serves HTTPS, use an https:// URL)" in log
    gw.wait_log("refused: the client spoke plain HTTP to the HTTPS port")


def peer_serial(port: int, ca: Path, name: str = "localhost", cert: str | None = None) -> int:
    ctx = trust(ca)
    if cert:
        ctx.load_cert_chain(ca.parent / f"{cert}.crt", ca.parent / f"{cert}.key")
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        ctx.wrap_socket(raw, server_hostname=name) as s,
    ):
        got = s.getpeercert()
    assert got is not None
    return int(str(got["serialNumber"]), 16)


def test_sighup_puts_renewed_certificates_on_new_connections(
    tmp_path: Path, certs: Path, upstream: FakeUpstream, procs: list[TlsService]
) -> None:
    d = tmp_path / "certs"
    shutil.copytree(certs, d)
    gw = start_gateway(procs, tmp_path, d, gateway_config(d))
    agent = start_agent(
        procs, tmp_path, agent_config(gw, "gpu-box-1", d, upstream.url, d / "ca.crt"), d / "ca.crt"
    )
    gw_before = peer_serial(gw.port, d / "ca.crt")
    agent_before = peer_serial(agent.port, d / "ca.crt", "gpu-box-1", "gateway")
    renew = [str(MAKE_CERTS), "-o", str(d), "--gateway-name", "gw.lan", "gpu-box-1"]
    subprocess.run(renew, check=True, capture_output=True)
    assert peer_serial(gw.port, d / "ca.crt") == gw_before  # nothing changes before the signal
    for p in (gw, agent):
        assert p.proc is not None
        p.proc.send_signal(signal.SIGHUP)
        p.wait_log("config reloaded")
    assert peer_serial(gw.port, d / "ca.crt") != gw_before
    assert peer_serial(agent.port, d / "ca.crt", "gpu-box-1", "gateway") != agent_before
    assert httpx.get(f"{gw.url}/health", verify=trust(d / "ca.crt")).status_code == 200
    # The agent still reaches the gateway with its renewed client certificate.
    wait_until(lambda: [n["node_id"] for n in nodes(gw)] == ["gpu-box-1"], 10, "gpu-box-1 registered")


def test_the_bare_uvicorn_command_says_it_does_not_serve_tls_cert_file(certs: Path, gateway: Any) -> None:
    cfg = gateway_config(certs, identity="key")
    cfg["tls"].update(cert_file=str(certs / "gateway.crt"), key_file=str(certs / "gateway.key"))
    gw = gateway(cfg, process=True)  # uvicorn rolemesh_gateway.main:app, plain HTTP
    assert httpx.get(f"{gw.url}/health", timeout=5).status_code == 200
    assert "warning: tls.cert_file is served by 'rolemesh-gateway' only" in gw.log_text()
