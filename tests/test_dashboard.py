"""The dashboard: its page in a real headless Chromium (a node comes and goes stale, a counter
moves, a wrong key is told so), its data endpoint over HTTP (shape, keys, CSP), and the rates,
windows and quantiles it computes, against a fake clock."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from rolemesh_gateway.gateway.app import Gateway, create_app
from rolemesh_gateway.gateway.dashboard import MAX_ERRORS, MAX_MESSAGE, Dashboard, quantile
from rolemesh_gateway.gateway.settings import parse_settings
from tests.browser import chromium
from tests.conftest import CLIENT_KEY, NODE_KEY, GatewayProcess
from tests.fakeclient import FakeClient, call_app, run
from tests.fakes import FakeUpstream

Gw = Callable[..., GatewayProcess]
Up = Callable[..., FakeUpstream]
ADMIN_KEY = "test-admin-key"
NODE_HEADERS = {"X-RoleMesh-Node-Key": NODE_KEY}


def config(writer: str, **extra: Any) -> dict[str, Any]:
    """A proxy alias ``writer``, a discovered alias ``coder``; client and node keys."""
    cfg: dict[str, Any] = {
        "version": 1,
        "default_model": "writer",
        "auth": {"client_api_keys": [CLIENT_KEY], "node_api_keys": [NODE_KEY]},
        "probes": {"interval_s": 0.3, "timeout_s": 0.5},
        "models": {
            "writer": {"type": "proxy", "proxy_url": writer},
            "coder": {"type": "discovered", "role": "coder", "strategy": "least_busy"},
        },
    }
    cfg.update(extra)
    return cfg


def register(gw: GatewayProcess, node_id: str, url: str, **load: Any) -> None:
    body = {"node_id": node_id, "base_url": url, "roles": ["coder"], "version": "0.1.0", **load}
    r = httpx.post(f"{gw.url}/v1/nodes/register", json=body, headers=NODE_HEADERS, timeout=5)
    assert r.status_code in (200, 201), r.text


def data(gw: GatewayProcess, key: str | None = CLIENT_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{gw.url}/dashboard/data", headers=headers, timeout=5)


# -- the browser ------------------------------------------------------------------------------
def test_the_page_shows_a_node_come_and_go_stale_and_requests_counted(gateway: Gw, upstreams: Up) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    up = upstreams("writer")
    gw = gateway(config(up.url, nodes={"stale_after_s": 2}))
    with chromium() as drv:
        driver: Any = drv
        driver.set_window_size(1400, 900)
        wait = WebDriverWait(driver, 10, poll_frequency=0.1)

        def text(css: str) -> str:
            found = driver.find_elements(By.CSS_SELECTOR, css)
            return str(found[0].text) if found else ""

        driver.get(f"{gw.url}/dashboard")
        wait.until(lambda d: driver.find_element(By.ID, "login").is_displayed())
        # A wrong key: told so in words, and forgotten.
        driver.find_element(By.ID, "key").send_keys("not-the-key")
        driver.find_element(By.ID, "login-button").click()
        wait.until(lambda d: "refused this key" in text("#login-error"))
        assert "invalid API key" in text("#login-error")
        assert driver.execute_script("return sessionStorage.length") == 0
        assert not driver.find_element(By.ID, "main").is_displayed()

        driver.find_element(By.ID, "key").send_keys(CLIENT_KEY)
        driver.find_element(By.ID, "login-button").click()
        wait.until(lambda d: driver.find_element(By.ID, "main").is_displayed())
        assert "Live" in text("#status")
        assert CLIENT_KEY not in driver.current_url  # in the tab's session storage, never a URL
        assert CLIENT_KEY in driver.execute_script("return Object.values(sessionStorage).join()")

        # A node registers: it appears, fresh, with its slots and version.
        register(gw, "gpu-1", up.url, slots_total=4, slots_busy=1)
        row = 'tr[data-key="gpu-1"]'

        def fresh_while_heartbeating(_: object) -> bool:
            hb = {"node_id": "gpu-1", "slots_total": 4, "slots_busy": 1}
            httpx.post(f"{gw.url}/v1/nodes/heartbeat", json=hb, headers=NODE_HEADERS, timeout=5)
            return "fresh" in text(f"{row} .col-state")

        wait.until(fresh_while_heartbeating)
        assert text(f"{row} .col-slots") == "1 / 4"
        assert text(f"{row} .col-version") == "0.1.0"
        assert "1 of 1 node fresh" in text('tr[data-key="coder"] .col-alias')
        # Meanwhile: requests through the proxy alias, and an error the gateway records (with
        # markup in it, to be shown as text and never run).
        assert text('tr[data-key="writer"] .col-requests') == "0"
        with gw.client() as c:
            for _ in range(3):
                assert (
                    c.post("/v1/chat/completions", json={"model": "writer", "messages": []}).status_code
                    == 200
                )
        app: Gateway = gw.app  # type: ignore[attr-defined]
        app.dashboard.record_error("rid-1", "writer", None, 502, "<img src=x onerror=alert(1)> failed")

        # The node stops heartbeating: stale after 2 s, in words (not only in colour).
        wait.until(lambda d: "stale" in text(f"{row} .col-state"))
        assert text("#k-nodes") == "0 / 1"
        wait.until(lambda d: text('tr[data-key="writer"] .col-requests') == "3")
        assert text('tr[data-key="writer"] .col-status').endswith("available")
        assert "unavailable" not in text('tr[data-key="writer"] .col-status')
        wait.until(lambda d: "<img src=x onerror=alert(1)> failed" in text("#errors tbody"))
        assert not driver.find_elements(By.CSS_SELECTOR, "#errors img")

        problems = [e for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]
        assert not problems, problems


def test_the_page_needs_no_key_on_a_gateway_without_keys(gateway: Gw, upstreams: Up) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    up = upstreams("writer")
    cfg = config(up.url)
    del cfg["auth"]
    gw = gateway(cfg)
    with chromium() as drv:
        driver: Any = drv
        driver.get(f"{gw.url}/dashboard")
        WebDriverWait(driver, 10, poll_frequency=0.1).until(
            lambda d: driver.find_elements(By.CSS_SELECTOR, 'tr[data-key="writer"]')
        )
        assert not driver.find_element(By.ID, "login").is_displayed()


# -- HTTP -------------------------------------------------------------------------------------
def test_the_page_is_public_offline_and_under_a_strict_csp(gateway: Gw, upstreams: Up) -> None:
    gw = gateway(config(upstreams("writer").url))
    page = httpx.get(f"{gw.url}/dashboard", timeout=5)  # no key: the page holds no data
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe" not in csp
    assert "frame-ancestors 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    html = page.text
    scripts = re.findall(r"<script\b[^>]*>", html)
    assert scripts and all("src=" in s for s in scripts)  # no inline script
    assert "<style" not in html and " style=" not in html
    assert not re.search(r"<[^>]*\son\w+=", html)  # no inline event handlers
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs and all(r.startswith("dashboard/static/") for r in refs)  # nothing from elsewhere

    for name, kind in [
        ("dashboard.js", "text/javascript"),
        ("dashboard.css", "text/css"),
        ("icon.svg", "image/svg"),
    ]:
        r = httpx.get(f"{gw.url}/dashboard/static/{name}", timeout=5)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), name
        assert "http://" not in r.text.replace("http://www.w3.org/", "") and "https://" not in r.text
    for name in ("nope.js", "dashboard.html", "../app.py", "%2e%2e/app.py"):
        assert httpx.get(f"{gw.url}/dashboard/static/{name}", timeout=5).status_code == 404, name


def test_the_data_needs_a_key(gateway: Gw, upstreams: Up) -> None:
    gw = gateway(config(upstreams("writer").url))
    for key in (None, "wrong-key", NODE_KEY):
        r = data(gw, key)
        assert r.status_code == 401, key
        assert r.json()["error"]["code"] == "invalid_api_key"
    r = data(gw)
    assert r.status_code == 200
    assert r.headers["cache-control"] == "no-store"
    assert httpx.get(f"{gw.url}/dashboard/data", headers={"X-Api-Key": CLIENT_KEY}).status_code == 200


def test_admin_keys_guard_the_data_when_there_are_any(gateway: Gw, upstreams: Up) -> None:
    cfg = config(upstreams("writer").url)
    cfg["auth"]["admin_api_keys"] = [ADMIN_KEY]
    gw = gateway(cfg)
    assert data(gw, CLIENT_KEY).status_code == 401
    assert data(gw, ADMIN_KEY).status_code == 200


def test_the_data_counts_what_happened(gateway: Gw, upstreams: Up) -> None:
    writer = upstreams("writer", chunks=4, chunk_interval_s=0.01)
    broken = upstreams("broken", status=500)
    cfg = config(writer.url)
    cfg["models"]["broken"] = {"type": "proxy", "proxy_url": broken.url}
    gw = gateway(cfg)
    register(gw, "gpu-2", writer.url, slots_total=2, slots_busy=0)
    register(gw, "gpu-1", writer.url, slots_total=4, slots_busy=3)
    app: Gateway = gw.app  # type: ignore[attr-defined]
    next(n for n in app.registry.all_nodes() if n.node_id == "gpu-2").draining = True
    with gw.client() as c:
        for _ in range(3):  # 3 completion tokens each
            assert c.post("/v1/chat/completions", json={"model": "writer", "messages": []}).status_code == 200
        body = {"model": "writer", "messages": [], "stream": True, "stream_options": {"include_usage": True}}
        for _ in range(2):  # 4 completion tokens each
            assert c.post("/v1/chat/completions", json=body).status_code == 200
        assert c.post("/v1/chat/completions", json={"model": "coder", "messages": []}).status_code == 200
        r = c.post(
            "/v1/chat/completions",
            json={"model": "broken", "messages": []},
            headers={"X-Request-Id": "rid-9"},
        )
        assert r.status_code == 500  # the request path records it (Inference.on_error)

    d = data(gw).json()
    assert set(d) == {
        "time", "version", "uptime_s", "stale_after_s", "windows", "totals", "aliases", "nodes",
        "history", "errors",
    }  # fmt: skip
    aliases = {a["alias"]: a for a in d["aliases"]}
    assert list(aliases) == ["writer", "coder", "broken"]  # in config order
    w = aliases["writer"]
    assert w["type"] == "proxy" and w["upstream"] == writer.url and w["available"] is True
    assert w["requests"] == 5 and w["error_ratio"] == 0.0
    assert w["requests_per_s"] > 0 and w["completion_tokens_per_s"] > 0
    assert 0 < w["latency_p50_s"] <= w["latency_p95_s"]
    assert w["ttft_p50_s"] is not None  # the streams
    assert w["inflight"] == 0 and w["queue_waiting"] == 0 and w["nodes"] is None
    coder = aliases["coder"]
    assert coder["type"] == "discovered" and coder["role"] == "coder" and coder["strategy"] == "least_busy"
    assert coder["requests"] == 1 and coder["ttft_p50_s"] is None
    assert coder["nodes"] == {"fresh": 1, "stale": 0, "ejected": 0, "draining": 1}
    assert aliases["broken"]["error_ratio"] == 1.0
    totals = d["totals"]
    assert totals["requests"] == 7 and totals["error_ratio"] == round(1 / 7, 4)
    assert totals["nodes"] == {"fresh": 1, "stale": 0, "ejected": 0, "draining": 1}
    nodes = {n["node_id"]: n for n in d["nodes"]}
    assert list(nodes) == ["gpu-1", "gpu-2"]
    assert nodes["gpu-1"]["state"] == "fresh" and nodes["gpu-2"]["state"] == "draining"
    assert nodes["gpu-1"]["slots_busy"] == 3 and nodes["gpu-1"]["slots_total"] == 4
    assert nodes["gpu-1"]["roles"] == ["coder"] and nodes["gpu-1"]["version"] == "0.1.0"
    assert 0 <= nodes["gpu-1"]["seconds_since_heartbeat"] < 5
    assert set(d["history"]) == {"t", "total", "aliases"}
    assert set(d["history"]["aliases"]) == {"writer", "coder", "broken"}
    assert d["errors"] == [
        {
            "time": d["errors"][0]["time"],
            "request_id": "rid-9",
            "alias": "broken",
            "node": None,
            "status": 500,
            "message": "the upstream answered HTTP 500",
        }
    ]
    assert d["stale_after_s"] == 30.0 and d["windows"]["sample_s"] == 2.0


# -- the arithmetic, against a fake clock -----------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def offline_gateway() -> Gateway:
    settings = parse_settings(config("http://w.test"), source="test")
    return create_app(settings, client=FakeClient())  # type: ignore[arg-type]


def finished(app: Gateway, alias: str, status: int = 200, seconds: float = 0.1, tokens: int = 0) -> None:
    app.stats.finished(alias, "/v1/chat/completions", status, seconds, "c", None, (1, tokens))


def test_rates_over_the_window_and_history_per_interval() -> None:
    async def go() -> None:
        app = offline_gateway()
        clock = Clock()
        dash = Dashboard(app, clock=clock)
        clock.now += 2
        await dash.sample()
        for _ in range(10):
            finished(app, "writer", tokens=5)
        clock.now += 2
        d = dash.report()  # takes the sample itself: no periodic task ran since
        w = next(a for a in d["aliases"] if a["alias"] == "writer")
        assert w["requests_per_s"] == 10 / 4  # since the baseline: less than a window of history
        assert w["completion_tokens_per_s"] == 50 / 4
        assert d["history"]["t"] == [1002.0, 1004.0]
        assert d["history"]["aliases"]["writer"]["requests_per_s"] == [0.0, 2.5]
        assert d["history"]["total"]["completion_tokens_per_s"] == [0.0, 12.5]
        await dash.sample()  # just sampled: skipped, no zero-length interval
        assert len(dash.report()["history"]["t"]) == 2

        for _ in range(10):  # 20 s on, quiet: the rate window has moved past the burst
            clock.now += 2
            await dash.sample()
        d = dash.report()
        w = next(a for a in d["aliases"] if a["alias"] == "writer")
        assert w["requests_per_s"] == 0.0
        assert w["error_ratio"] == 0.0 and w["latency_p50_s"] is not None  # still in the minute
        # Each point of the history is the rate over the 10 s before it, as the current rate is.
        assert (
            d["history"]["aliases"]["writer"]["requests_per_s"]
            == [0.0, 2.5, 1.667, 1.25, 1.0, 1.0] + [0.0] * 6
        )
        assert d["history"]["aliases"]["coder"]["requests_per_s"] == [0.0] * 12

    run(go())


def test_error_ratio_and_quantiles_cover_the_last_minute_only() -> None:
    async def go() -> None:
        app = offline_gateway()
        clock = Clock()
        dash = Dashboard(app, clock=clock)
        for _ in range(3):
            finished(app, "writer", status=502, seconds=2.0)
        finished(app, "writer", seconds=0.02)
        clock.now += 2
        await dash.sample()
        w = next(a for a in dash.report()["aliases"] if a["alias"] == "writer")
        assert w["error_ratio"] == 0.75
        assert w["latency_p95_s"] > 1.0
        for _ in range(31):  # a quiet minute later: nothing in the window
            clock.now += 2
            await dash.sample()
        d = dash.report()
        w = next(a for a in d["aliases"] if a["alias"] == "writer")
        assert w["error_ratio"] is None and w["latency_p50_s"] is None and w["requests"] == 4
        assert d["totals"]["error_ratio"] is None

    run(go())


def test_history_is_bounded_and_errors_newest_first() -> None:
    async def go() -> None:
        app = offline_gateway()
        clock = Clock()
        dash = Dashboard(app, clock=clock)
        for _ in range(400):
            clock.now += 2
            await dash.sample()
        t = dash.report()["history"]["t"]
        assert len(t) == 300 and t[-1] - t[0] == 598.0  # ten minutes, one point per 2 s
        for i in range(MAX_ERRORS + 5):
            dash.record_error(f"r{i}", "writer", "gpu-1", 503, "x" * 1000)
        errors = dash.report()["errors"]
        assert len(errors) == MAX_ERRORS
        assert errors[0]["request_id"] == f"r{MAX_ERRORS + 4}" and errors[-1]["request_id"] == "r5"
        assert len(errors[0]["message"]) == MAX_MESSAGE

    run(go())


def test_a_node_stale_and_draining_is_stale() -> None:
    async def go() -> None:
        app = offline_gateway()
        body = {"node_id": "n1", "base_url": "http://127.0.0.1:9", "roles": ["coder"]}
        sent = await call_app(
            app, "POST", "/v1/nodes/register", body, [(b"x-rolemesh-node-key", NODE_KEY.encode())]
        )
        assert sent.status == 201
        node = app.registry.all_nodes()[0]
        node.draining = True
        assert app.dashboard.report()["nodes"][0]["state"] == "draining"
        node.last_seen -= 60  # stale says more than draining: the node is silent
        assert app.dashboard.report()["nodes"][0]["state"] == "stale"
        sent = await call_app(app, "GET", "/dashboard/data", headers=[(b"x-api-key", CLIENT_KEY.encode())])
        assert orjson.loads(sent.body)["totals"]["nodes"]["stale"] == 1

    run(go())


@pytest.mark.parametrize(
    ("counts", "q", "expected"),
    [
        ([0, 0, 0, 0], 0.5, None),
        ([10, 0, 0, 0], 0.5, 0.5),  # the first bucket starts at 0
        ([0, 10, 0, 0], 0.5, 1.5),  # interpolated inside (1, 2]
        ([0, 0, 4, 0], 0.95, 3.9),
        ([0, 0, 0, 7], 0.5, 4.0),  # beyond the last bound: that bound, as Prometheus says
        ([5, 5, 0, 0], 0.5, 1.0),
    ],
)
def test_quantile_interpolates_like_prometheus(counts: list[int], q: float, expected: float | None) -> None:
    got = quantile((1.0, 2.0, 4.0), counts, q)
    assert got == (None if expected is None else pytest.approx(expected))
