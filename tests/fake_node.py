"""A fake node as its own process: an OpenAI fake server that registers and heartbeats.

Used by the fault-injection tests, which SIGKILL, SIGSTOP and partition it like a real box.
``python -m tests.fake_node --gateway URL --node-id ID --role writer --key K [--host H]``
"""

from __future__ import annotations

import argparse
import sys
import time

import httpx

from tests.fakes import FakeUpstream


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gateway", required=True)
    p.add_argument("--node-id", required=True)
    p.add_argument("--role", action="append", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--heartbeat", type=float, default=0.5)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--chunks", type=int, default=3)
    p.add_argument("--chunk-interval", type=float, default=0.0)
    p.add_argument("--slots", type=int, default=0)
    a = p.parse_args()
    up = FakeUpstream(
        a.node_id,
        port=a.port,
        delay_s=a.delay,
        chunks=a.chunks,
        chunk_interval_s=a.chunk_interval,
        host=a.host,
    ).start()
    base_url = f"http://{a.host}:{up.port}"
    headers = {"X-RoleMesh-Node-Key": a.key}
    reg = {"node_id": a.node_id, "base_url": base_url, "roles": a.role}
    if a.slots:
        reg["slots_total"] = a.slots
    print(f"listening {base_url}", flush=True)
    registered = False
    with httpx.Client(base_url=a.gateway, headers=headers, timeout=2) as c:
        while True:
            try:
                if not registered:
                    registered = c.post("/v1/nodes/register", json=reg).status_code in (200, 201)
                    if registered:
                        print("registered", flush=True)
                else:
                    r = c.post("/v1/nodes/heartbeat", json={"node_id": a.node_id})
                    registered = r.status_code != 404
            except httpx.HTTPError as exc:
                print(f"gateway unreachable: {exc.__class__.__name__}", file=sys.stderr, flush=True)
            time.sleep(a.heartbeat)


if __name__ == "__main__":
    main()
