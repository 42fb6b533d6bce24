"""``rolemesh-node-agent``: run the node agent, or validate its config file.

``main()`` parses arguments; ``serve()`` / ``validate()`` do the work. uvicorn handles SIGTERM
and SIGINT: it stops listening, gives requests in flight ``--graceful-timeout`` seconds, then
runs the agent's shutdown (deregister, stop children, close the pool), each step bounded.
A second Ctrl-C exits at once; the children still die with the agent (parent-death signal).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from ..logs import setup_logging
from ..settings import INSECURE_ENV, ConfigError, insecure_bind_allowed, is_loopback
from .config import DEFAULT_HOST, DEFAULT_PORT, AgentConfig, load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rolemesh-node-agent",
        description="Run llama-server processes for a RoleMesh gateway and serve them by role.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command")
    s = sub.add_parser("serve", help="run the agent (the default command)")
    _serve_args(s)
    v = sub.add_parser("validate", help="check a config file and explain what is wrong")
    v.add_argument("config", help="agent config file (YAML)")
    _serve_args(p)
    return p


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="agent config file (YAML)")
    p.add_argument("--host", default=None, help=f"bind address (overrides host:, default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=None, help=f"port (overrides port:, default {DEFAULT_PORT})")
    p.add_argument("--log-level", default=None, help="debug, info, warning (default info)")
    p.add_argument(
        "--graceful-timeout",
        type=int,
        default=10,
        help="seconds requests in flight may take to finish on shutdown (default 10)",
    )
    p.add_argument(
        "--allow-insecure-bind",
        action="store_true",
        default=None,
        help=f"bind a non-loopback address without a node_key (or {INSECURE_ENV}=1)",
    )


def _summary(path: str, cfg: AgentConfig) -> str:
    lines = [
        f"{path}: OK, node {cfg.node_id}, {len(cfg.roles)} roles, listens on {cfg.host}:{cfg.port}, "
        f"registers at {cfg.gateway_url} as {cfg.base_url} every {cfg.heartbeat_interval_s:g}s"
    ]
    for role, rc in cfg.roles.items():
        if rc.llama_server is not None:
            spec = rc.llama_server
            lines.append(
                f"  {role}: llama-server {spec.binary} -m {spec.model} {' '.join(spec.args)}".rstrip()
            )
        else:
            lines.append(f"  {role}: url {rc.url}")
    if cfg.node_key is None:
        lines.append("  warning: no node_key: anyone who can reach the agent can use its models")
    return "\n".join(lines)


def validate(path: str) -> int:
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        print(f"rolemesh-node-agent: config error: {exc}", file=sys.stderr)
        return 2
    print(_summary(path, cfg))
    return 0


def serve(
    path: str,
    host: str | None,
    port: int | None,
    allow_insecure: bool,
    log_level: str | None,
    graceful_timeout: int,
) -> int:
    """Validate, check the bind address is safe, bind, then run uvicorn with the agent app."""
    setup_logging(log_level)
    try:
        cfg = load_config(path, overrides={"host": host, "port": port})
    except ConfigError as exc:
        print(f"rolemesh-node-agent: config error: {exc}", file=sys.stderr)
        return 2
    if not is_loopback(cfg.host) and cfg.node_key is None and not allow_insecure:
        print(
            f"rolemesh-node-agent: refusing to listen on {cfg.host} without node_key: anyone on the "
            "network could use this node's models. Set node_key, bind 127.0.0.1, or pass "
            f"--allow-insecure-bind ({INSECURE_ENV}=1) if you really mean it.",
            file=sys.stderr,
        )
        return 2
    import uvicorn

    from .app import create_app

    config = uvicorn.Config(
        create_app(cfg),
        host=cfg.host,
        port=cfg.port,
        loop="auto",
        http="auto",
        log_level=(log_level or "info").lower(),
        access_log=False,
        server_header=False,
        date_header=False,
        lifespan="on",
        timeout_graceful_shutdown=graceful_timeout,
    )
    server = uvicorn.Server(config)
    # Bind before the lifespan starts any llama-server: a busy port fails fast and clean.
    sock = config.bind_socket()
    # uvicorn marks it inheritable (for its worker processes); llama-server children must not
    # hold the agent's port open.
    sock.set_inheritable(False)
    server.run(sockets=[sock])
    return 0 if server.started else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "validate":
        return validate(args.config)
    if not args.config:
        print("rolemesh-node-agent: --config agent.yaml is required", file=sys.stderr)
        return 2
    allow = insecure_bind_allowed(args.allow_insecure_bind)
    return serve(args.config, args.host, args.port, allow, args.log_level, args.graceful_timeout)


if __name__ == "__main__":
    sys.exit(main())
