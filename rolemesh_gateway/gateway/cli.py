"""``rolemesh-gateway``: serve the gateway (the default), or validate a config file.

``main()`` only parses; :func:`serve` and :func:`validate` do the work. Every option has an
environment variable (``--help`` names it and the default).
"""

from __future__ import annotations

import os
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
from .settings import CONFIG_ENV, TLS_ENV_PREFIX, Settings, load_settings
from .strategies import STRATEGIES

PROGRAM = "rolemesh-gateway"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
#: Streams of a slow model can take long: give them time to finish on a restart.
DEFAULT_GRACEFUL_S = 30


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
        chain = s.fallback_chain(alias)
        then = f"; fallbacks: {' -> '.join(chain)}" if chain else ""
        lines.append(f"  {alias} ({s.advertised_name(alias)}): {m.type} {where}{then}")
    lines.append(f"  {s.tls.summary()}; nodes.identity={s.nodes.identity}")
    if not s.auth.client_api_keys:
        lines.append("  warning: no auth.client_api_keys: anyone who can reach the gateway can use it")
    return "\n".join(lines)


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
    """Validate, check the bind address is safe, bind, then run the gateway until stopped."""
    setup_logging(log_level, log_format)
    export_tls(TLS_ENV_PREFIX, tls_files)
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

    app = create_app(settings, access_log=bool(access_log), config_path=config or os.environ.get(CONFIG_ENV))
    return run_server(
        PROGRAM,
        app,
        sock,
        log_level,
        DEFAULT_GRACEFUL_S if graceful_timeout is None else graceful_timeout,
        bool(access_log),
        settings.limits,
        tls=app.server_ssl,
    )


cli = make_cli(
    Program(
        name=PROGRAM,
        help="OpenAI-compatible gateway that routes by role to llama-server nodes.",
        version=__version__,
        config_env=CONFIG_ENV,
        config_help="The gateway's YAML config file.",
        env_prefix="ROLE_MESH",
        default_port=DEFAULT_PORT,
        default_graceful_s=DEFAULT_GRACEFUL_S,
        serve=serve,
        validate=validate,
    )
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``rolemesh-gateway``; returns the exit status."""
    return run_cli(cli, argv, PROGRAM)


if __name__ == "__main__":
    sys.exit(main())
