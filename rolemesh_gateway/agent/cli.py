"""``rolemesh-node-agent``: run the node agent (the default), or validate its config file.

``main()`` only parses; :func:`serve` and :func:`validate` do the work. uvicorn handles SIGTERM
and SIGINT: it stops listening, gives requests in flight ``--graceful-timeout`` seconds, then
runs the agent's shutdown (deregister, stop children, close the pool), each step bounded.
A second Ctrl-C exits at once; the children still die with the agent (parent-death signal).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import click

from ..common.cli import STARTUP_FAILURE, bind, bind_guard, fail, merged, run_cli, run_server, serve_options
from ..common.errors import ConfigError
from ..common.logs import setup_logging
from ..common.version import __version__
from .config import AGENT_CONFIG_ENV, AgentConfig, load_config

PROGRAM = "rolemesh-node-agent"
#: Shorter than the gateway's: the agent's own shutdown (deregister, stop children) follows.
DEFAULT_GRACEFUL_S = 10

_config_option = click.option(
    "--config",
    "config",
    envvar=AGENT_CONFIG_ENV,
    show_envvar=True,
    type=click.Path(dir_okay=False),
    default=None,
    help="The agent's YAML config file (required).",
)


@click.group(
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, "--version", prog_name=PROGRAM, message="%(prog)s %(version)s")
@_config_option
@serve_options("ROLE_MESH_AGENT", None, DEFAULT_GRACEFUL_S)
@click.pass_context
def cli(ctx: click.Context, /, **options: Any) -> None:
    """Run llama-server processes for a RoleMesh gateway and serve them by role.

    Without a command it serves (the same as 'serve').
    """
    if ctx.invoked_subcommand is None:
        sys.exit(serve(**options))


@cli.command("serve")
@_config_option
@serve_options("ROLE_MESH_AGENT", None, DEFAULT_GRACEFUL_S)
@click.pass_context
def serve_command(ctx: click.Context, /, **options: Any) -> None:
    """Run the agent (the default command)."""
    sys.exit(serve(**merged(ctx, options)))


@cli.command("validate")
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@click.pass_context
def validate_command(ctx: click.Context, file: str | None) -> None:
    """Check a config file (FILE, else --config, else $ROLE_MESH_AGENT_CONFIG) and explain what is wrong."""
    parent = ctx.parent.params if ctx.parent is not None else {}
    sys.exit(validate(file or parent.get("config")))


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
    graceful_timeout: int | None = None,
    access_log: bool | None = None,
    allow_insecure_bind: bool | None = None,
) -> int:
    """Validate, check the bind address is safe, bind, then run the agent until stopped."""
    setup_logging(log_level)
    path = _require(config)
    try:
        cfg = load_config(path, overrides={"host": host, "port": port})
    except ConfigError as exc:
        fail(PROGRAM, f"config error: {exc}")
    bind_guard(PROGRAM, cfg.host, cfg.node_key is not None, "node_key", allow_insecure_bind)

    # Bound before any llama-server starts: a busy port fails fast and clean. With port 0 the
    # port is known only now, and the gateway must be told the real one.
    sock = bind(PROGRAM, cfg.host, cfg.port)
    if cfg.port == 0:
        cfg = cfg.model_copy(update={"port": sock.getsockname()[1]})

    from .app import create_app

    return run_server(
        PROGRAM,
        create_app(cfg),
        sock,
        log_level,
        DEFAULT_GRACEFUL_S if graceful_timeout is None else graceful_timeout,
        bool(access_log),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``rolemesh-node-agent``; returns the exit status."""
    return run_cli(cli, argv, PROGRAM)


if __name__ == "__main__":
    sys.exit(main())
