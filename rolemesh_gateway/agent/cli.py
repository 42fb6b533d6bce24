"""``rolemesh-node-agent``: run the node agent (the default), or validate its config file.

``main()`` only parses; :func:`serve` and :func:`validate` do the work. uvicorn handles SIGTERM
and SIGINT: it stops listening, gives requests in flight ``--graceful-timeout`` seconds, then
runs the agent's shutdown (deregister, stop children, close the pool), each step bounded.
A second Ctrl-C exits at once; the children still die with the agent (parent-death signal).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from ..common.cli import (
    STARTUP_FAILURE,
    Program,
    bind,
    bind_guard,
    export_tls,
    fail,
    make_cli,
    run_cli,
    run_server,
)
from ..common.errors import ConfigError
from ..common.logs import setup_logging
from ..common.version import __version__
from .config import AGENT_CONFIG_ENV, TLS_ENV_PREFIX, AgentConfig, load_config

PROGRAM = "rolemesh-node-agent"
#: Shorter than the gateway's: the agent's own shutdown (deregister, stop children) follows.
DEFAULT_GRACEFUL_S = 10


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
            lines.append(f"  {role}: proxy_url {rc.proxy_url}")
    lines.append(f"  {cfg.tls.summary()}")
    if cfg.node_key is None:
        lines.append("  warning: no node_key: anyone who can reach the agent can use its models")
    return "\n".join(lines)


def _require(path: str | None) -> str:
    if not path:
        fail(PROGRAM, f"no config file: pass --config agent.yaml (or set {AGENT_CONFIG_ENV})")
    assert path is not None
    return path


def validate(path: str | None) -> int:
    """Print a summary of a good config (exit 0), or the one line that says what is wrong (2)."""
    path = _require(path)
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        click.echo(f"{PROGRAM}: config error: {exc}", err=True)
        return STARTUP_FAILURE
    click.echo(_summary(path, cfg))
    return 0


def serve(
    config: str | None = None,
    host: str | None = None,
    port: int | None = None,
    log_level: str | None = None,
    log_format: str | None = None,
    graceful_timeout: int | None = None,
    access_log: bool | None = None,
    allow_insecure_bind: bool | None = None,
    **tls_files: str | None,
) -> int:
    """Validate, check the bind address is safe, bind, then run the agent until stopped."""
    setup_logging(log_level, log_format)
    export_tls(TLS_ENV_PREFIX, tls_files)
    path = _require(config)
    try:
        cfg = load_config(path, overrides={"host": host, "port": port})
    except ConfigError as exc:
        fail(PROGRAM, f"config error: {exc}")
    # Mutual TLS that requires a certificate protects the agent as a node key does.
    protected = cfg.node_key is not None or (cfg.tls.mutual and cfg.tls.client_certs == "required")
    bind_guard(PROGRAM, cfg.host, protected, "node_key (or tls.client_ca_file)", allow_insecure_bind)

    # Bound before any llama-server starts: a busy port fails fast and clean. With port 0 the
    # port is known only now, and the gateway must be told the real one.
    sock = bind(PROGRAM, cfg.host, cfg.port)
    if cfg.port == 0:
        cfg = cfg.model_copy(update={"port": sock.getsockname()[1]})

    from .app import create_app

    app = create_app(cfg, config_path=path)
    return run_server(
        PROGRAM,
        app,
        sock,
        log_level,
        DEFAULT_GRACEFUL_S if graceful_timeout is None else graceful_timeout,
        bool(access_log),
        cfg.limits,
        app.exiting,
        tls=app.server_ssl,
    )


cli = make_cli(
    Program(
        name=PROGRAM,
        help="Run llama-server processes for a RoleMesh gateway and serve them by role.",
        version=__version__,
        config_env=AGENT_CONFIG_ENV,
        config_help="The agent's YAML config file (required).",
        env_prefix="ROLE_MESH_AGENT",
        default_port=None,
        default_graceful_s=DEFAULT_GRACEFUL_S,
        serve=serve,
        validate=validate,
    )
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``rolemesh-node-agent``; returns the exit status."""
    return run_cli(cli, argv, PROGRAM)


if __name__ == "__main__":
    sys.exit(main())
