"""``rolemesh-gateway``: serve the gateway (the default), or validate a config file.

``main()`` only parses; :func:`serve` and :func:`validate` do the work. Every option has an
environment variable (``--help`` names it and the default).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import click

from ..common.cli import STARTUP_FAILURE, bind, bind_guard, fail, merged, run_cli, run_server, serve_options
from ..common.errors import ConfigError
from ..common.logs import setup_logging
from ..common.version import __version__
from .settings import CONFIG_ENV, Settings, load_settings
from .strategies import STRATEGIES

PROGRAM = "rolemesh-gateway"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
#: Streams of a slow model can take long: give them time to finish on a restart.
DEFAULT_GRACEFUL_S = 30

_config_option = click.option(
    "--config",
    "config",
    envvar=CONFIG_ENV,
    show_envvar=True,
    type=click.Path(dir_okay=False),
    default=None,
    help="The gateway's YAML config file.",
)


@click.group(
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, "--version", prog_name=PROGRAM, message="%(prog)s %(version)s")
@_config_option
@serve_options("ROLE_MESH", DEFAULT_PORT, DEFAULT_GRACEFUL_S)
@click.pass_context
def cli(ctx: click.Context, /, **options: Any) -> None:
    """OpenAI-compatible gateway that routes by role to llama-server nodes.

    Without a command it serves (the same as 'serve').
    """
    if ctx.invoked_subcommand is None:
        sys.exit(serve(**options))


@cli.command("serve")
@_config_option
@serve_options("ROLE_MESH", DEFAULT_PORT, DEFAULT_GRACEFUL_S)
@click.pass_context
def serve_command(ctx: click.Context, /, **options: Any) -> None:
    """Run the gateway (the default command)."""
    sys.exit(serve(**merged(ctx, options)))


@cli.command("validate")
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@click.pass_context
def validate_command(ctx: click.Context, file: str | None) -> None:
    """Check a config file (FILE, else --config, else $ROLE_MESH_CONFIG) and explain what is wrong."""
    parent = ctx.parent.params if ctx.parent is not None else {}
    sys.exit(validate(file or parent.get("config")))


def validate(path: str | None) -> int:
    """Print a summary of a good config (exit 0), or the one line that says what is wrong (2)."""
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        click.echo(f"{PROGRAM}: config error: {exc}", err=True)
        return STARTUP_FAILURE
    click.echo(_summary(path or os.environ.get(CONFIG_ENV, ""), settings))
    return 0


def _summary(path: str, s: Settings) -> str:
    lines = [f"{path}: OK, {len(s.models)} aliases, default_model={s.default_model}"]
    for alias, m in s.models.items():
        if m.type == "proxy":
            where = m.proxy_url
        else:
            where = f"role={m.role} strategy={m.strategy} ({STRATEGIES[m.strategy][1]})"
        lines.append(f"  {alias} ({s.advertised_name(alias)}): {m.type} {where}")
    if not s.auth.client_api_keys:
        lines.append("  warning: no auth.client_api_keys: anyone who can reach the gateway can use it")
    return "\n".join(lines)


def serve(
    config: str | None = None,
    host: str | None = None,
    port: int | None = None,
    log_level: str | None = None,
    graceful_timeout: int | None = None,
    access_log: bool | None = None,
    allow_insecure_bind: bool | None = None,
) -> int:
    """Validate, check the bind address is safe, bind, then run the gateway until stopped."""
    setup_logging(log_level)
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        fail(PROGRAM, f"config error: {exc}")
    host = host or DEFAULT_HOST
    bind_guard(
        PROGRAM, host, bool(settings.auth.client_api_keys), "auth.client_api_keys", allow_insecure_bind
    )

    sock = bind(PROGRAM, host, DEFAULT_PORT if port is None else port)

    from .app import create_app

    return run_server(
        PROGRAM,
        create_app(settings),
        sock,
        log_level,
        DEFAULT_GRACEFUL_S if graceful_timeout is None else graceful_timeout,
        bool(access_log),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``rolemesh-gateway``; returns the exit status."""
    return run_cli(cli, argv, PROGRAM)


if __name__ == "__main__":
    sys.exit(main())
