"""``rolemesh-gateway``: serve the gateway, or validate a config file.

``main()`` parses arguments; ``serve()`` / ``validate()`` do the work.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from . import __version__
from .logs import setup_logging
from .settings import (
    CONFIG_ENV,
    INSECURE_ENV,
    ConfigError,
    Settings,
    insecure_bind_allowed,
    is_loopback,
    load_settings,
)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_GRACEFUL_S = 30


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rolemesh-gateway",
        description="OpenAI-compatible gateway that routes by role to llama-server nodes.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command")
    s = sub.add_parser("serve", help="run the gateway (the default command)")
    _serve_args(s)
    v = sub.add_parser("validate", help="check a config file and explain what is wrong")
    v.add_argument("config", nargs="?", help=f"config file (default: ${CONFIG_ENV})")
    _serve_args(p)
    return p


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help=f"config file (default: ${CONFIG_ENV})")
    p.add_argument("--host", default=None, help=f"bind address (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=None, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--log-level", default=None, help="debug, info, warning (default info)")
    p.add_argument(
        "--graceful-timeout",
        type=int,
        default=None,
        help="on SIGTERM, seconds to let in-flight requests and streams finish (default 30)",
    )
    p.add_argument(
        "--access-log",
        action="store_true",
        help="log a line per request (off by default: it costs about as much CPU as the relaying)",
    )
    p.add_argument(
        "--allow-insecure-bind",
        action="store_true",
        default=None,
        help=f"bind a non-loopback address without client API keys (or {INSECURE_ENV}=1)",
    )


def validate(path: str | None) -> int:
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        print(f"rolemesh-gateway: config error: {exc}", file=sys.stderr)
        return 2
    print(_summary(path or os.environ.get(CONFIG_ENV, ""), settings))
    return 0


def _summary(path: str, s: Settings) -> str:
    lines = [f"{path}: OK, {len(s.models)} aliases, default_model={s.default_model}"]
    for alias, m in s.models.items():
        where = (
            getattr(m, "proxy_url", None)
            or f"role={getattr(m, 'role', '')} strategy={getattr(m, 'strategy', '')}"
        )
        lines.append(f"  {alias} ({s.advertised_name(alias)}): {m.type} {where}")
    if not s.auth.client_api_keys:
        lines.append("  warning: no auth.client_api_keys: anyone who can reach the gateway can use it")
    return "\n".join(lines)


def serve(
    path: str | None,
    host: str,
    port: int,
    allow_insecure: bool,
    log_level: str | None,
    graceful_timeout_s: int = DEFAULT_GRACEFUL_S,
    access_log: bool = False,
) -> int:
    """Validate, check the bind address is safe, then run uvicorn (uvloop + httptools)."""
    setup_logging(log_level)
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        print(f"rolemesh-gateway: config error: {exc}", file=sys.stderr)
        return 2
    if not is_loopback(host) and not settings.auth.client_api_keys and not allow_insecure:
        print(
            f"rolemesh-gateway: refusing to listen on {host} without auth.client_api_keys: anyone "
            f"on the network could use it. Configure keys, bind 127.0.0.1, or pass "
            f"--allow-insecure-bind ({INSECURE_ENV}=1) if you really mean it.",
            file=sys.stderr,
        )
        return 2
    import uvicorn

    from .app import create_app

    app = create_app(settings)
    uvicorn.run(
        app,
        host=host,
        port=port,
        loop="auto",
        http="auto",
        log_level=log_level or "info",
        access_log=access_log,
        timeout_graceful_shutdown=graceful_timeout_s,
        server_header=False,
        date_header=False,
        lifespan="on",
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "validate":
        return validate(args.config)
    allow = insecure_bind_allowed(args.allow_insecure_bind)
    graceful = args.graceful_timeout if args.graceful_timeout is not None else DEFAULT_GRACEFUL_S
    return serve(
        args.config,
        args.host or DEFAULT_HOST,
        args.port or DEFAULT_PORT,
        allow,
        args.log_level,
        graceful,
        args.access_log,
    )


if __name__ == "__main__":
    sys.exit(main())
