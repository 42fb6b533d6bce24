"""The ``tls:`` section, the contexts it makes, and HTTPS under the programs' own protocol.

Servers here are the real uvicorn + guarded protocol in this process, on 127.0.0.1:0, with
certificates made by scripts/make_certs.sh.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rolemesh_gateway.agent.config import parse_config
from rolemesh_gateway.common.asgi import Receive, Scope, Send, send_json
from rolemesh_gateway.common.config import Limits
from rolemesh_gateway.common.errors import ConfigError, UpstreamFailed, UpstreamUnreachable
from rolemesh_gateway.common.http1 import Client
from rolemesh_gateway.common.server import guarded_protocol
from rolemesh_gateway.common.tls import (
    TlsSettings,
    cert_names,
    client_context,
    reload_server_context,
    reload_tls,
    server_context,
)
from rolemesh_gateway.gateway.settings import parse_settings
from tests.conftest import ROOT
from tests.serve import InProcessServer

MAKE_CERTS = ROOT / "scripts" / "make_certs.sh"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    subprocess.run([str(MAKE_CERTS), "-o", str(d), "gpu-box-1"], check=True, capture_output=True)
    return d


async def echo_tls(scope: Scope, receive: Receive, send: Send) -> None:
    """An app that answers what the TLS extension says about the caller."""
    if scope["type"] != "http":
        return
    tls = scope.get("extensions", {}).get("tls")
    await send_json(
        send,
        200,
        {
            "scheme": scope["scheme"],
            "names": list(tls["client_cert_names"]) if tls else None,
            "subject": tls["client_cert_name"] if tls else None,
            "chain": len(tls["client_cert_chain"]) if tls else None,
        },
    )


def serve(ctx: ssl.SSLContext | None, limits: Limits | None = None) -> InProcessServer:
    return InProcessServer(echo_tls, http=guarded_protocol(limits or Limits(), ctx)).start()


@pytest.fixture
def servers() -> Iterator[list[InProcessServer]]:
    started: list[InProcessServer] = []
    yield started
    for s in started:
        s.stop()


def tls(certs: Path, **kw: Any) -> TlsSettings:
    return TlsSettings(cert_file=str(certs / "gateway.crt"), key_file=str(certs / "gateway.key"), **kw)


def trust(certs: Path, cert: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    if cert:
        ctx.load_cert_chain(certs / f"{cert}.crt", certs / f"{cert}.key")
    return ctx


# -- config ---------------------------------------------------------------------------------
def test_bad_tls_settings_are_one_line_config_errors(certs: Path, tmp_path: Path) -> None:
    base = {"version": 1, "default_model": "m", "models": {"m": {"type": "discovered", "role": "m"}}}

    def error(tls: dict[str, Any], **extra: Any) -> str:
        with pytest.raises(ConfigError) as exc:
            parse_settings({**base, "tls": tls, **extra}, env={})
        return str(exc.value)

    missing = str(tmp_path / "nope.crt")
    assert error({"cert_file": missing}) == f"config: tls.cert_file: {missing!r} does not exist"
    assert "tls.client_ca_file needs tls.cert_file" in error({"client_ca_file": str(certs / "ca.crt")})
    wrong_key = error({"cert_file": str(certs / "gateway.crt"), "key_file": str(certs / "gpu-box-1.key")})
    assert "tls.cert_file/key_file:" in wrong_key and "key values mismatch" in wrong_key
    not_pem = tmp_path / "x.pem"
    not_pem.write_text("hello")
    assert "tls.ca_file: " in error({"ca_file": str(not_pem)})
    assert "tls.client_key_file needs tls.client_cert_file" in error({"client_key_file": "k"})
    assert "tls.client_certs: got 'maybe'" in error({**tls(certs).model_dump(), "client_certs": "maybe"})
    enc = tmp_path / "enc.key"
    subprocess.run(
        [
            *("openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-aes256"),
            *("-pass", "pass:secret", "-out", str(enc)),
        ],
        check=True,
        capture_output=True,
    )
    encrypted = error({"cert_file": str(certs / "gateway.crt"), "key_file": str(enc)})
    assert "holds an encrypted key; give the key unencrypted" in encrypted  # and no prompt on a tty
    need_mtls = error(tls(certs).model_dump(exclude_none=True), nodes={"identity": "certificate"})
    assert "nodes.identity: certificate needs tls.cert_file and tls.client_ca_file" in need_mtls


def test_tls_environment_variables_win_over_the_file(certs: Path, fake_files: dict[str, str]) -> None:
    base = {"version": 1, "default_model": "m", "models": {"m": {"type": "discovered", "role": "m"}}}
    env = {
        "ROLE_MESH_TLS_CERT_FILE": str(certs / "gateway.crt"),
        "ROLE_MESH_TLS_KEY_FILE": str(certs / "gateway.key"),
    }
    s = parse_settings({**base, "tls": {"cert_file": "/nowhere"}}, env=env)
    assert s.tls.cert_file == str(certs / "gateway.crt") and s.tls.serving

    agent = {
        "node_id": "gpu-box-1",
        "gateway_url": "https://127.0.0.1:8080",
        "roles": {"w": {"llama_server": {"model": fake_files["model"], "binary": fake_files["binary"]}}},
    }
    plain = parse_config(agent, env={})
    assert plain.base_url.startswith("http://")
    env = {
        "ROLE_MESH_AGENT_TLS_CERT_FILE": str(certs / "gpu-box-1.crt"),
        "ROLE_MESH_AGENT_TLS_KEY_FILE": str(certs / "gpu-box-1.key"),
    }
    served = parse_config(agent, env=env)
    assert served.base_url == "https://127.0.0.1:8091"  # the gateway is told to use https


def test_cert_names_are_dns_names_then_the_common_name() -> None:
    cert = {
        "subject": ((("commonName", "gpu-box-1"),),),
        "subjectAltName": (("DNS", "gpu-box-1"), ("IP Address", "10.0.0.12"), ("DNS", "gpu1.lan")),
    }
    assert cert_names(cert) == ("gpu-box-1", "gpu1.lan")
    assert cert_names({"subject": ((("commonName", "a"),),)}) == ("a",)
    assert cert_names({}) == () and cert_names(None) == ()


# -- serving --------------------------------------------------------------------------------
def test_https_carries_the_client_certificate_to_the_app(certs: Path, servers: list[InProcessServer]) -> None:
    ctx = server_context(tls(certs, client_ca_file=str(certs / "ca.crt"), client_certs="optional"))
    srv = serve(ctx)
    servers.append(srv)
    url = f"https://127.0.0.1:{srv.port}/"
    with_cert = httpx.get(url, verify=trust(certs, "gpu-box-1")).json()
    assert with_cert == {"scheme": "https", "names": ["gpu-box-1"], "subject": "CN=gpu-box-1", "chain": 1}
    without = httpx.get(url, verify=trust(certs)).json()
    assert without == {"scheme": "https", "names": [], "subject": None, "chain": 0}

    # required: no certificate, no connection (and the server says why)
    srv2 = serve(server_context(tls(certs, client_ca_file=str(certs / "ca.crt"))))
    servers.append(srv2)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"https://127.0.0.1:{srv2.port}/", verify=trust(certs))
    assert httpx.get(f"https://127.0.0.1:{srv2.port}/", verify=trust(certs, "gpu-box-1")).status_code == 200
    deadline = time.monotonic() + 5
    while "peer did not return a certificate" not in srv2.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "TLS handshake with 127.0.0.1:" in srv2.log_text()
    assert "refused: peer did not return a certificate" in srv2.log_text()


def test_plain_http_without_tls_has_no_tls_extension(servers: list[InProcessServer]) -> None:
    srv = serve(None)
    servers.append(srv)
    assert httpx.get(f"http://127.0.0.1:{srv.port}/").json()["names"] is None


def test_head_deadline_and_connection_cap_hold_over_tls(certs: Path, servers: list[InProcessServer]) -> None:
    srv = serve(server_context(tls(certs)), Limits(head_timeout_s=0.5, max_connections=2))
    servers.append(srv)
    url = f"https://127.0.0.1:{srv.port}/"
    # No handshake at all, or a handshake and then no request: both closed at the head deadline.
    silent = socket.create_connection(("127.0.0.1", srv.port))
    idle = trust(certs).wrap_socket(
        socket.create_connection(("127.0.0.1", srv.port)), server_hostname="localhost"
    )
    start = time.monotonic()
    for s in (silent, idle):
        s.settimeout(3)
        assert s.recv(1) == b""
        s.close()
    assert time.monotonic() - start < 1.5

    # At the cap (2), silent connections make room for one that sends a request.
    flood = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(4)]
    try:
        with httpx.Client(verify=trust(certs)) as client:
            assert client.get(url).status_code == 200
    finally:
        for s in flood:
            s.close()


def serial(port: int, ctx: ssl.SSLContext) -> int:
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as s,
    ):
        cert = s.getpeercert()
    assert cert is not None
    return int(str(cert["serialNumber"]), 16)


def test_reload_puts_a_renewed_certificate_on_new_connections(
    certs: Path, tmp_path: Path, servers: list[InProcessServer]
) -> None:
    d = tmp_path / "certs"
    shutil.copytree(certs, d)
    settings = tls(d)
    ctx = server_context(settings)
    assert ctx is not None
    srv = serve(ctx)
    servers.append(srv)
    before = serial(srv.port, trust(d))
    subprocess.run(
        [str(MAKE_CERTS), "-o", str(d), "--gateway-name", "gw.lan"], check=True, capture_output=True
    )
    assert reload_tls(ctx, settings) is None
    after = serial(srv.port, trust(d))
    assert after != before

    (d / "gateway.key").write_text("not a key")
    assert "tls.cert_file/key_file:" in (reload_tls(ctx, settings) or "")
    assert serial(srv.port, trust(d)) == after  # still serving the last good one
    with pytest.raises(ValueError):
        reload_server_context(ctx, settings)
    assert reload_tls(None, settings) == "tls.cert_file: turning HTTPS on or off needs a restart"


# -- calling out ----------------------------------------------------------------------------
def test_client_checks_the_name_given_and_reports_tls_errors(
    certs: Path, servers: list[InProcessServer]
) -> None:
    srv = serve(server_context(tls(certs)))
    servers.append(srv)
    url = f"https://127.0.0.1:{srv.port}/"
    plain = f"http://127.0.0.1:{srv.port}/"

    async def call(client: Client, url: str, name: str | None = None) -> int:
        resp = await client.open("GET", url, [], b"", _T, "node n", None, name)
        try:
            await resp.read()
            return resp.status
        finally:
            resp.release()

    async def main() -> None:
        ours = Client(ssl_context=client_context(TlsSettings(ca_file=str(certs / "ca.crt"))))
        assert await call(ours, url) == 200  # the gateway certificate names 127.0.0.1
        assert await call(ours, url, "localhost") == 200
        with pytest.raises(UpstreamUnreachable, match="certificate verify failed: Hostname mismatch"):
            await call(ours, url, "gpu-box-1")
        with pytest.raises(UpstreamUnreachable, match="bad TLS server name 'xxxxx"):
            await call(ours, url, "x" * 100)  # a node_id may be longer than a DNS label
        system = Client()  # the system's store does not know our CA
        with pytest.raises(
            UpstreamUnreachable,
            match=r"cannot connect to node n: certificate verify failed: unable to get local issuer",
        ):
            await call(system, url)
        with pytest.raises(UpstreamFailed, match=r"if it serves HTTPS, use an https:// URL"):
            await call(ours, plain)
        await ours.close()
        await system.close()

    asyncio.run(main())


class _T:
    connect_s = first_byte_s = idle_s = 3.0
    total_s = 3.0


def test_validate_says_what_is_served_and_trusted(
    certs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rolemesh_gateway.gateway import cli

    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        "version: 1\ndefault_model: m\nmodels: {m: {type: discovered, role: m}}\n"
        f"nodes: {{identity: both}}\ntls: {{cert_file: {certs}/gateway.crt, key_file: {certs}/gateway.key, "
        f"client_ca_file: {certs}/ca.crt, client_certs: optional, ca_file: {certs}/ca.crt}}\n"
    )
    assert cli.main(["validate", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert f"tls: serves HTTPS, client certificates optional (CA {certs}/ca.crt); " in out
    assert f"calls out trusting CA {certs}/ca.crt; nodes.identity=both" in out
    assert TlsSettings().summary() == "tls: serves plain HTTP; calls out trusting the system's CAs"
