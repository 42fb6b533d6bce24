"""What the two command lines share: options, the bind-safety check and how uvicorn is started.

Both CLIs are click groups whose ``main()`` only parses; every option has a ``ROLE_MESH_*``
environment variable, shown in ``--help`` with its default. Both programs start uvicorn the
same way: the socket is bound first (a busy port fails at once, before any start-up work, and
``--port 0`` picks a free port that is then printed), then the server runs on it.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from .config import INSECURE_ENV, Limits, is_loopback
from .logs import LOG_FORMAT_ENV, LOG_FORMATS, LOG_LEVEL_ENV, LOG_LEVELS
from .tls import FILE_KEYS, env_name

F = TypeVar("F", bound=Callable[..., Any])

#: Exit status when the program could not start (bad config, unsafe bind, busy port).
STARTUP_FAILURE = 2

log = logging.getLogger("rolemesh")


def serve_options(env_prefix: str, default_port: int | None, default_graceful_s: int) -> Callable[[F], F]:
    """The options of ``serve``, on the group and on ``serve`` (a later one wins).

    ``env_prefix`` is ``ROLE_MESH`` for the gateway and ``ROLE_MESH_AGENT`` for the agent, so
    that one environment (a systemd ``EnvironmentFile``) can hold both programs' settings.
    """

    def apply(fn: F) -> F:
        options = [
            click.option(
                "--host",
                envvar=f"{env_prefix}_HOST",
                default=None,
                show_envvar=True,
                help="Bind address [default: 127.0.0.1"
                + ("" if default_port is not None else ", or host: in the config file")
                + "]",
            ),
            click.option(
                "--port",
                envvar=f"{env_prefix}_PORT",
                type=click.IntRange(0, 65535),
                default=None,
                show_envvar=True,
                help=f"Port; 0 picks a free one [default: {default_port or 'port: in the config, or 8091'}]",
            ),
            click.option(
                "--log-level",
                envvar=LOG_LEVEL_ENV,
                type=click.Choice(LOG_LEVELS, case_sensitive=False),
                default=None,
                show_envvar=True,
                help="Log level [default: info]",
            ),
            click.option(
                "--graceful-timeout",
                envvar=f"{env_prefix}_GRACEFUL_TIMEOUT",
                type=click.IntRange(0, None),
                default=None,
                show_envvar=True,
                help="On SIGTERM, seconds that requests and streams in flight may take to finish "
                f"[default: {default_graceful_s}]",
            ),
            click.option(
                "--log-format",
                envvar=LOG_FORMAT_ENV,
                type=click.Choice(LOG_FORMATS, case_sensitive=False),
                default=None,
                show_envvar=True,
                help="Log lines as text or one JSON object each [default: text]",
            ),
            click.option(
                "--access-log/--no-access-log",
                envvar=f"{env_prefix}_ACCESS_LOG",
                default=None,
                show_envvar=True,
                help="Log a line per request: id, client, alias, node, status, time, tokens (off by default)",
            ),
            *tls_options(env_prefix),
            click.option(
                "--allow-insecure-bind",
                envvar=INSECURE_ENV,
                is_flag=True,
                default=None,
                show_envvar=True,
                help="Bind a non-loopback address without keys configured (you really mean it)",
            ),
        ]
        for option in reversed(options):
            fn = option(fn)
        return fn

    return apply


#: The ``tls:`` keys that have an option: ``--tls-cert-file`` / ``{PREFIX}_TLS_CERT_FILE`` ...
TLS_OPTIONS = {
    "cert_file": "Serve HTTPS with this certificate (PEM) [config: tls.cert_file]",
    "key_file": "The key of --tls-cert-file [config: tls.key_file]",
    "client_ca_file": "Ask clients for a certificate signed by this CA (mutual TLS; one is required "
    "unless tls.client_certs is optional) [config: tls.client_ca_file]",
    "ca_file": "Verify the https servers this program calls against this CA instead of the "
    "system's [config: tls.ca_file]",
    "client_cert_file": "Present this certificate to https servers that ask for one "
    "[config: tls.client_cert_file]",
    "client_key_file": "The key of --tls-client-cert-file [config: tls.client_key_file]",
}


def tls_options(env_prefix: str) -> list[Callable[[F], F]]:
    """``--tls-cert-file`` ... one option per ``tls:`` file key, each with its environment variable."""
    return [
        click.option(
            f"--tls-{key.replace('_', '-')}",
            f"tls_{key}",
            envvar=env_name(env_prefix, key),
            type=click.Path(dir_okay=False),
            default=None,
            show_envvar=True,
            help=text,
        )
        for key, text in TLS_OPTIONS.items()
    ]


def export_tls(env_prefix: str, given: dict[str, Any]) -> None:
    """Put the ``--tls-*`` options given into the environment, where the config loader reads
    them over the file's ``tls:`` keys: at start and again on every reload."""
    for key in FILE_KEYS:
        value = given.get(f"tls_{key}")
        if value:
            os.environ[env_name(env_prefix, key)] = value


def merged(ctx: click.Context, given: dict[str, Any]) -> dict[str, Any]:
    """The group's option values overridden by those given to the subcommand."""
    values = dict(ctx.parent.params) if ctx.parent is not None else {}
    values.update({k: v for k, v in given.items() if v is not None})
    return values


@dataclass(frozen=True)
class Program:
    """What differs between the two command lines; :func:`make_cli` builds the same shape."""

    name: str
    help: str
    version: str
    config_env: str
    config_help: str
    env_prefix: str
    default_port: int | None
    default_graceful_s: int
    serve: Callable[..., int]
    validate: Callable[[str | None], int]


def make_cli(p: Program) -> click.Group:
    """``PROGRAM [OPTIONS] [serve [OPTIONS] | validate [FILE]]``; serving is the default."""
    config_option = click.option(
        "--config",
        "config",
        envvar=p.config_env,
        show_envvar=True,
        type=click.Path(dir_okay=False),
        default=None,
        help=p.config_help,
    )
    options = serve_options(p.env_prefix, p.default_port, p.default_graceful_s)

    @click.group(
        help=f"{p.help}\n\nWithout a command it serves (the same as 'serve').",
        invoke_without_command=True,
        context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    )
    @click.version_option(p.version, "--version", prog_name=p.name, message="%(prog)s %(version)s")
    @config_option
    @options
    @click.pass_context
    def cli(ctx: click.Context, /, **given: Any) -> None:
        if ctx.invoked_subcommand is None:
            sys.exit(p.serve(**given))

    @cli.command("serve")
    @config_option
    @options
    @click.pass_context
    def serve_command(ctx: click.Context, /, **given: Any) -> None:
        """Run the program (the default command)."""
        sys.exit(p.serve(**merged(ctx, given)))

    @cli.command("validate", help=f"Check a config file (FILE, else --config, else ${p.config_env}).")
    @click.argument("file", required=False, type=click.Path(dir_okay=False))
    @click.pass_context
    def validate_command(ctx: click.Context, file: str | None) -> None:
        parent = ctx.parent.params if ctx.parent is not None else {}
        export_tls(p.env_prefix, parent)  # --tls-* given before 'validate' are checked too
        sys.exit(p.validate(file or parent.get("config")))

    return cli


def fail(program: str, message: str) -> None:
    """Print ``program: message`` to stderr and exit with :data:`STARTUP_FAILURE`."""
    click.echo(f"{program}: {message}", err=True)
    sys.exit(STARTUP_FAILURE)


def bind_guard(program: str, host: str, protected: bool, keys_hint: str, allow: bool | None) -> None:
    """Refuse a non-loopback bind without keys unless the user said they mean it."""
    if is_loopback(host) or protected or allow:
        return
    fail(
        program,
        f"refusing to listen on {host} without {keys_hint}: anyone on the network could use it. "
        f"Configure keys, bind 127.0.0.1, or pass --allow-insecure-bind ({INSECURE_ENV}=1) "
        "if you really mean it.",
    )


def bind(program: str, host: str, port: int) -> socket.socket:
    """Bind the listening socket now (``port`` 0 picks a free one); exit cleanly if we cannot."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        fail(program, f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    # Listening now: clients that come during start-up wait in the backlog instead of being
    # refused, and the port printed below already accepts connections.
    sock.listen(2048)
    # Children (llama-server) must not inherit the listening socket.
    sock.set_inheritable(False)
    return sock


def run_server(
    program: str,
    app: Any,
    sock: socket.socket,
    log_level: str | None,
    graceful_s: int,
    access_log: bool,
    limits: Limits,
    on_exit_signal: Callable[[], None] | None = None,
    tls: ssl.SSLContext | None = None,
) -> int:
    """Run ``app`` under uvicorn (uvloop + httptools, with our client limits) until stopped.

    ``on_exit_signal`` is called as soon as SIGTERM or SIGINT arrives, before uvicorn starts
    waiting for requests in flight (the lifespan shutdown comes only after that wait). With
    ``tls`` the server speaks HTTPS only (:class:`~rolemesh_gateway.common.server.TlsHandshake`).
    """
    import uvicorn

    from .server import guarded_protocol

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if on_exit_signal is not None:
                on_exit_signal()
            super().handle_exit(sig, frame)

    level = (log_level or "info").lower()
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="auto",
        http=guarded_protocol(limits, tls),
        timeout_keep_alive=int(limits.keepalive_s) or 1,
        log_level=level,
        access_log=False,  # ours (rolemesh.access) says more: see the app's access_log
        server_header=False,
        date_header=False,
        lifespan="on",
        timeout_graceful_shutdown=graceful_s,
    )
    server = Server(config)
    scheme = "https" if tls is not None else "http"
    log.info("%s listening on %s://%s:%d", program, scheme, f"[{host}]" if ":" in host else host, port)
    server.run(sockets=[sock])
    return 0 if server.started else 1


def run_cli(group: click.Group, argv: Sequence[str] | None, program: str) -> int:
    """Run a click group and return its exit status (instead of exiting), for ``main()``."""
    try:
        group.main(args=list(argv) if argv is not None else None, prog_name=program, standalone_mode=False)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return STARTUP_FAILURE
    except click.exceptions.Abort:
        click.echo("Aborted!", err=True)
        return 1
    return 0
