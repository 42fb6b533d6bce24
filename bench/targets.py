"""Start the systems under test: RoleMesh, the bare relay, LiteLLM. Each on a free port."""

from __future__ import annotations

import json
from pathlib import Path

from .procs import Proc, free_port

REPO = Path(__file__).resolve().parent.parent
CLIENT_KEY = "bench-client-key"
NODE_KEY = "bench-node-key"
#: LiteLLM 1.106 refuses to start without a master key; a long random-looking one passes its check.
LITELLM_KEY = "sk-bench-5f1c2a9e7d3b4c6a8e0f1a2b3c4d5e6f"

_UVICORN_FAST = ["--loop", "uvloop", "--http", "httptools", "--no-access-log"]


def gateway_config(planner_url: str, extra: dict[str, object] | None = None) -> dict[str, object]:
    """A gateway config: ``planner`` proxies to ``planner_url``; ``writer`` is discovered."""
    return {
        "version": 1,
        "default_model": "planner",
        "auth": {"client_api_keys": [CLIENT_KEY], "node_api_keys": [NODE_KEY]},
        "models": {
            "planner": {"type": "proxy", "proxy_url": planner_url},
            "writer": {"type": "discovered", "role": "writer", "strategy": "round_robin"},
        },
        **(extra or {}),
    }


def source_env(src: Path | None) -> tuple[dict[str, str], str]:
    """Environment and working directory that make ``rolemesh_gateway`` import from ``src``.

    ``None`` means the installed (editable) package of this checkout. Another tree lets you
    measure a proposed change before it lands: ``bench/run.sh --gateway-src /tmp/copy``.
    """
    if src is None:
        return {}, str(REPO)
    return {"PYTHONPATH": str(src)}, str(src)


def start_rolemesh(
    work: Path, python: str, name: str, config: dict[str, object], src: Path | None = None
) -> tuple[Proc, str]:
    """One gateway process exactly as the guide runs it: uvicorn, uvloop, httptools."""
    cfg = work / f"{name}.yaml"
    cfg.write_text(json.dumps(config, indent=2))  # JSON is YAML
    port = free_port()
    env, cwd = source_env(src)
    proc = Proc(
        name,
        [
            python,
            "-m",
            "uvicorn",
            "rolemesh_gateway.main:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *_UVICORN_FAST,
        ],
        work,
        env={"ROLE_MESH_CONFIG": str(cfg), **env},
        cwd=cwd,
    )
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(url + "/health", 30)
    return proc, url


def start_bare_relay(work: Path, python: str, upstream: str, name: str = "bare-relay") -> tuple[Proc, str]:
    port = free_port()
    proc = Proc(
        name,
        [
            python,
            "-m",
            "uvicorn",
            "--app-dir",
            str(REPO / "bench"),
            "bare_relay:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *_UVICORN_FAST,
        ],
        work,
        env={"BENCH_UPSTREAM": upstream},
    )
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(url + "/anything", 30)  # relays to nginx, which answers 200
    return proc, url


def start_litellm(work: Path, venv: Path, upstream: str) -> tuple[Proc, str]:
    """LiteLLM proxy with default settings, one worker, an openai-compatible upstream."""
    cfg = work / "litellm.yaml"
    cfg.write_text(
        json.dumps(
            {
                "model_list": [
                    {
                        "model_name": "planner",
                        "litellm_params": {
                            "model": "openai/planner",
                            "api_base": upstream + "/v1",
                            "api_key": "bench-upstream-key",
                        },
                    }
                ],
                "general_settings": {"master_key": LITELLM_KEY},
            },
            indent=2,
        )
    )
    port = free_port()
    proc = Proc(
        "litellm",
        [
            str(venv / "bin" / "litellm"),
            "--config",
            str(cfg),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
        ],
        work,
        # The bundled cost map instead of a download at start-up (no internet here).
        env={"LITELLM_LOCAL_MODEL_COST_MAP": "True"},
    )
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(url + "/health/liveliness", 180)
    return proc, url
