"""A page on another origin streams a chat completion from the gateway with ``fetch``, in a real
headless Chromium: the browser, not our own reading of the headers, decides whether CORS works."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from tests.browser import chromium, serve_page
from tests.conftest import CLIENT_KEY, GatewayProcess, proxy_config
from tests.fakes import FakeUpstream

#: The page takes the gateway's URL from its own query string: ?gw=http://127.0.0.1:PORT
PAGE = (
    """<!doctype html><html><body><pre id="out">running</pre><script>
(async () => {
  const out = document.getElementById("out");
  const gw = new URLSearchParams(location.search).get("gw");
  try {
    const r = await fetch(gw + "/v1/chat/completions", {
      method: "POST",
      headers: {"Authorization": "Bearer CLIENT_KEY", "Content-Type": "application/json"},
      body: JSON.stringify({model: "writer", stream: true, messages: [{role: "user", content: "hi"}]}),
    });
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let text = "", reads = 0;
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      reads += 1;
      text += decoder.decode(value, {stream: true});
    }
    out.textContent = JSON.stringify({status: r.status, reads, text, rid: r.headers.get("x-request-id")});
  } catch (e) {
    out.textContent = JSON.stringify({error: String(e)});
  }
})();
</script></body></html>"""
).replace("CLIENT_KEY", CLIENT_KEY)


def stream_from_page(
    allow: Callable[[str], list[str]], gateway: Callable[..., GatewayProcess], up: FakeUpstream
) -> dict[str, Any]:
    """Load the page (its own origin), let it stream from a gateway whose ``cors.allow_origins``
    is ``allow(page origin)``, and return what the page reports."""
    with serve_page(PAGE) as origin, chromium() as driver:
        cfg = proxy_config(writer=up.url)
        cfg["cors"] = {"allow_origins": allow(origin)}
        gw = gateway(cfg)
        driver.get(f"{origin}/?gw={gw.url}")  # type: ignore[attr-defined]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            text = driver.find_element("id", "out").text  # type: ignore[attr-defined]
            if text != "running":
                return dict(json.loads(text))
            time.sleep(0.1)
    raise AssertionError("the page never finished its fetch")


def test_a_page_on_an_allowed_origin_streams_a_chat_completion(
    gateway: Callable[..., GatewayProcess], upstreams: Callable[..., FakeUpstream]
) -> None:
    up = upstreams("writer", chunks=5, chunk_interval_s=0.1)
    got = stream_from_page(lambda origin: [origin], gateway, up)
    assert got.get("status") == 200, got
    events = [line for line in got["text"].split("\n") if line.startswith("data: ")]
    assert len(events) == 7 and events[-1] == "data: [DONE]"  # 5 chunks, the finish chunk, the end
    assert got["reads"] >= 3  # read as it streamed, not in one piece at the end
    assert got["rid"]  # the exposed request id is readable by the page


def test_a_page_on_another_origin_is_refused_by_the_browser(
    gateway: Callable[..., GatewayProcess], upstreams: Callable[..., FakeUpstream]
) -> None:
    up = upstreams("writer", chunks=2)
    got = stream_from_page(lambda origin: ["http://127.0.0.1:1"], gateway, up)
    assert "error" in got and "Failed to fetch" in got["error"]
