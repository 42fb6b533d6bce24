"""Fault injection against real processes: kills, freezes, partitions, saturation.

Every test is bounded in time; nodes are fake-node processes (tests/fake_node.py) that the
tests SIGKILL / SIGSTOP; the partition test puts nodes in Linux network namespaces.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import CLIENT_KEY, NODE_KEY, ROOT, GatewayProcess, wait_until
from tests.fakes import free_port

Gw = Callable[..., GatewayProcess]
SOAK_S = float(os.environ.get("ROLE_MESH_SOAK_S", "60"))


class NodeProc:
    """One fake node process; ``kill()``/``start()`` simulate a box dying and coming back."""

    def __init__(
        self,
        gw_url: str,
        node_id: str,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        netns: str | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.gw_url, self.node_id, self.host, self.netns, self.args = gw_url, node_id, host, netns, args
        self.port = port or free_port()
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> NodeProc:
        cmd = [
            sys.executable,
            "-m",
            "tests.fake_node",
            "--gateway",
            self.gw_url,
            "--node-id",
            self.node_id,
            "--role",
            "writer",
            "--key",
            NODE_KEY,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--heartbeat",
            "0.3",
            *self.args,
        ]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("registered"):
                return self
            if not line and self.proc.poll() is not None:
                break
        raise AssertionError(f"fake node {self.node_id} did not register")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(5)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def nodes() -> Iterator[Callable[..., NodeProc]]:
    made: list[NodeProc] = []

    def make(gw: GatewayProcess | str, node_id: str, **kw: Any) -> NodeProc:
        url = gw if isinstance(gw, str) else gw.url
        n = NodeProc(url, node_id, **kw).start()
        made.append(n)
        return n

    yield make
    for n in made:
        n.kill()


def config(strategy: str = "round_robin", **extra: Any) -> dict[str, Any]:
    model: dict[str, Any] = {"type": "discovered", "role": "writer", "strategy": strategy, "max_attempts": 3}
    model.update(extra.pop("model", {}))
    return {
        "version": 1,
        "default_model": "writer",
        "auth": {"client_api_keys": [CLIENT_KEY], "node_api_keys": [NODE_KEY]},
        "timeouts": {"connect_s": 1, "first_byte_s": 1, "idle_s": 2},
        "models": {"writer": model},
        **extra,
    }


def chat(c: httpx.Client, **body: Any) -> httpx.Response:
    return c.post("/v1/chat/completions", json={"model": "writer", "messages": [], **body})


@pytest.mark.soak
def test_kill_one_of_three_nodes_every_10s_under_load(gateway: Gw, nodes: Callable[..., NodeProc]) -> None:
    gw = gateway(config(), env={"ROLE_MESH_NODE_STALE_AFTER_S": "2"})
    fleet = [nodes(gw, f"n{i}", args=("--delay", "0.02")) for i in range(3)]
    stop = time.monotonic() + SOAK_S
    ok = [0] * 16
    failures: list[str] = []

    def client(i: int) -> None:
        with gw.client() as c:
            while time.monotonic() < stop:
                try:
                    r = chat(c)
                    if r.status_code == 200:
                        ok[i] += 1
                    else:
                        failures.append(f"{r.status_code} {r.text[:200]}")
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    victim = 0
    kills = 0
    while time.monotonic() + 10 < stop:
        time.sleep(5)
        fleet[victim].kill()
        kills += 1
        time.sleep(5)
        fleet[victim].start()  # same id, same port: a rebooted box
        victim = (victim + 1) % 3
    for t in threads:
        t.join(SOAK_S + 30)
    assert failures == [], failures[:5]
    assert kills >= max(1, int(SOAK_S // 10) - 1)
    assert sum(ok) > 100


def test_node_killed_mid_stream_ends_with_sse_error_quickly(
    gateway: Gw, nodes: Callable[..., NodeProc]
) -> None:
    gw = gateway(config())
    node = nodes(gw, "streamer", args=("--chunks", "50", "--chunk-interval", "0.1"))
    lines: list[str] = []
    killed_at = 0.0
    with (
        gw.client() as c,
        c.stream(
            "POST", "/v1/chat/completions", json={"model": "writer", "messages": [], "stream": True}
        ) as r,
    ):
        assert r.status_code == 200
        for line in r.iter_lines():
            if line:
                lines.append(line)
            if len(lines) == 3 and not killed_at:
                node.kill()
                killed_at = time.monotonic()
    closed_after = time.monotonic() - killed_at
    # Told as soon as the node dies, not after the idle limit (2 s) or the stream's end (4.7 s).
    assert killed_at and closed_after < 2.0
    assert lines[-1].startswith('data: {"error"')
    assert "upstream_" in lines[-1]


def test_frozen_node_times_out_then_traffic_moves_and_it_goes_stale(
    gateway: Gw, nodes: Callable[..., NodeProc]
) -> None:
    cfg = config()
    cfg["timeouts"]["first_byte_s"] = 3
    gw = gateway(cfg, env={"ROLE_MESH_NODE_STALE_AFTER_S": "3"})
    good = nodes(gw, "good")
    frozen = nodes(gw, "frozen")
    frozen.signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    with gw.client() as c:
        slow = []
        for _ in range(4):
            t0 = time.monotonic()
            r = chat(c)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "hello from good"
            slow.append(time.monotonic() - t0)
        # Requests that went to the frozen node first waited out first_byte_s (3 s), then moved.
        assert max(slow) >= 2.9
        wait_until(
            lambda: (
                {n["node_id"]: n["status"] for n in c.get("/v1/nodes").json()["data"]}["frozen"] == "stale"
            ),
            10,
            "frozen node to go stale",
        )
        assert time.monotonic() - frozen_at >= 2.5
        t0 = time.monotonic()
        for _ in range(4):
            assert chat(c).status_code == 200
        assert time.monotonic() - t0 < 2.9  # stale: not one detour of first_byte_s (3 s)
    del good


def test_least_busy_prefers_fast_node_and_queues(gateway: Gw, nodes: Callable[..., NodeProc]) -> None:
    gw = gateway(config("least_busy"))
    nodes(gw, "fast", args=("--delay", "0.01"))
    nodes(gw, "slow", args=("--delay", "0.4"))
    counts: dict[str, int] = {}
    lock = threading.Lock()

    def worker() -> None:
        with gw.client() as c:
            for _ in range(15):
                who = chat(c).json()["choices"][0]["message"]["content"]
                with lock:
                    counts[who] = counts.get(who, 0) + 1

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert counts["hello from fast"] > 3 * counts.get("hello from slow", 0), counts


def _burst(gw: GatewayProcess, n: int) -> list[httpx.Response]:
    out: list[httpx.Response] = []
    lock = threading.Lock()

    def one() -> None:
        with gw.client() as c:
            r = chat(c)
        with lock:
            out.append(r)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def test_queue_serves_waiters_then_reports_full_and_timeout(
    gateway: Gw, nodes: Callable[..., NodeProc]
) -> None:
    cfg = config("least_busy", model={"queue": {"max_size": 4, "max_wait_s": 5}})
    cfg["timeouts"]["first_byte_s"] = 5
    gw = gateway(cfg)
    nodes(gw, "a", args=("--delay", "0.5", "--slots", "1"))
    nodes(gw, "b", args=("--delay", "0.5", "--slots", "1"))
    t0 = time.monotonic()
    burst = _burst(gw, 6)
    assert [r.status_code for r in burst] == [200] * 6, [r.text for r in burst]
    assert time.monotonic() - t0 >= 1.4  # three waves of two: the queue really waited

    cfg = config("least_busy", model={"queue": {"max_size": 1, "max_wait_s": 0.3}})
    cfg["timeouts"]["first_byte_s"] = 5
    gw2 = gateway(cfg)
    nodes(gw2, "c", args=("--delay", "1.0", "--slots", "1"))
    statuses = sorted((r.status_code, r.json().get("error", {}).get("code")) for r in _burst(gw2, 3))
    assert statuses == [(200, None), (429, "queue_full"), (503, "queue_timeout")], statuses


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _netns_missing() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    try:
        subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.CalledProcessError):
        return "needs iproute2 ('ip netns'); apt-get install iproute2"
    return None


@pytest.fixture
def lab() -> Iterator[dict[str, str]]:
    """Two node hosts in their own network namespaces, a veth link each to this host.

    This host holds the gateway address 10.231.0.1 (on lo); node i is 10.231.i.2
    behind veth ``<tag>a<i>`` whose root-side end can be set down to cut the link.
    """
    reason = _netns_missing()
    if reason:
        pytest.skip(reason)
    tag = f"rm{os.getpid() % 100000}"
    hosts = {"gateway_ip": "10.231.0.1"}
    made_ns: list[str] = []
    try:
        _ip("addr", "add", "10.231.0.1/32", "dev", "lo")
        for i in (1, 2):
            ns, a, b = f"{tag}n{i}", f"{tag}a{i}", f"{tag}b{i}"
            _ip("netns", "add", ns)
            made_ns.append(ns)
            _ip("link", "add", a, "type", "veth", "peer", "name", b)
            _ip("link", "set", b, "netns", ns)
            _ip("addr", "add", f"10.231.{i}.1/24", "dev", a)
            _ip("link", "set", a, "up")
            _ip("-n", ns, "addr", "add", f"10.231.{i}.2/24", "dev", b)
            _ip("-n", ns, "link", "set", b, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "default", "via", f"10.231.{i}.1")
            hosts[f"ns{i}"], hosts[f"link{i}"], hosts[f"ip{i}"] = ns, a, f"10.231.{i}.2"
        yield hosts
    finally:
        for ns in made_ns:
            subprocess.run(["ip", "netns", "pids", ns], capture_output=True, timeout=10)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        for i in (1, 2):
            subprocess.run(["ip", "link", "del", f"{tag}a{i}"], capture_output=True, timeout=10)
        subprocess.run(["ip", "addr", "del", "10.231.0.1/32", "dev", "lo"], capture_output=True, timeout=10)


def test_network_partition_node_goes_stale_traffic_moves_and_returns(
    tmp_path: Any, nodes: Callable[..., NodeProc], lab: dict[str, str]
) -> None:
    gw = GatewayProcess(config(), tmp_path, env={"ROLE_MESH_NODE_STALE_AFTER_S": "2"})
    gw.proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rolemesh_gateway.gateway.cli",
            "--config",
            str(gw.config_path),
            "--host",
            lab["gateway_ip"],
            "--port",
            str(gw.port),
        ],
        cwd=ROOT,
        env=gw.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://{lab['gateway_ip']}:{gw.port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/health").status_code == 200, 20, "gateway in the lab")
        nodes(url, "n1", host=lab["ip1"], netns=lab["ns1"])
        nodes(url, "n2", host=lab["ip2"], netns=lab["ns2"])
        with httpx.Client(base_url=url, headers={"X-Api-Key": CLIENT_KEY}, timeout=10) as c:
            served = {chat(c).json()["choices"][0]["message"]["content"] for _ in range(6)}
            assert served == {"hello from n1", "hello from n2"}
            _ip("link", "set", lab["link1"], "down")
            cut = time.monotonic()

            def status() -> dict[str, str]:
                return {n["node_id"]: n["status"] for n in c.get("/v1/nodes").json()["data"]}

            failures = 0
            while status()["n1"] != "stale":
                assert time.monotonic() - cut < 5, "partitioned node did not go stale"
                failures += chat(c).status_code != 200
                time.sleep(0.05)
            assert time.monotonic() - cut >= 1.5
            after = [chat(c) for _ in range(20)]
            assert all(r.status_code == 200 for r in after)
            assert {r.json()["choices"][0]["message"]["content"] for r in after} == {"hello from n2"}
            assert failures == 0
            _ip("link", "set", lab["link1"], "up")
            wait_until(lambda: status()["n1"] == "fresh", 10, "n1 fresh after the link is back")
            served = {chat(c).json()["choices"][0]["message"]["content"] for _ in range(6)}
            assert served == {"hello from n1", "hello from n2"}
    finally:
        gw.stop()


def test_clients_that_stop_reading_a_stream_free_the_nodes_slots(
    gateway: Gw, upstreams: Callable[..., Any]
) -> None:
    """Audit finding 5: two stalled readers used to pin a 2-slot node as full for good, so every
    other request of a least_busy role queued and timed out."""
    node = upstreams("n", chunks=200_000)  # tens of MB of SSE, written as fast as it is taken
    cfg = config(
        strategy="least_busy",
        limits={"write_timeout_s": 1},
        queue={"max_size": 10, "max_wait_s": 20},
    )
    gw = gateway(cfg)
    body = {"node_id": "n", "base_url": node.url, "roles": ["writer"], "slots_total": 2}
    r = httpx.post(f"{gw.url}/v1/nodes/register", json=body, headers={"X-RoleMesh-Node-Key": NODE_KEY})
    assert r.status_code == 201
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-api-key: "
        + CLIENT_KEY.encode()
        + b"\r\ncontent-type: application/json\r\ncontent-length: 17\r\n\r\n"
        + b'{"stream": true}\n'
    )
    stalled = []
    for _ in range(2):  # they ask for a stream and never read a byte of it
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", gw.port))
        s.sendall(request)
        stalled.append(s)
    try:
        with gw.client() as c:
            wait_until(
                lambda: c.get("/v1/nodes").json()["data"][0]["inflight"] == 2,
                5,
                "both slots taken by the stalled",
            )
            started = time.monotonic()
            wait_until(lambda: c.get("/v1/nodes").json()["data"][0]["inflight"] == 0, 10, "the slots freed")
            assert time.monotonic() - started < 8  # the 1 s write timeout, not forever
            node.chunks = 2
            r = c.post("/v1/chat/completions", json={"messages": []})
            assert r.status_code == 200  # served at once, not queued behind the stalled ones
        time.sleep(0.5)  # for the server's own lines
        log = gw.log_text()
        assert "read nothing for 1s (limits.write_timeout_s)" in log
        assert "without completing response" not in log  # the stalled connections were dropped
        assert stalled[0].recv(1 << 20)  # what was sent before the stall, then the connection ends
        stalled[0].settimeout(5)
        while stalled[0].recv(1 << 20):
            pass
    finally:
        for s in stalled:
            s.close()
