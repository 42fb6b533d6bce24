"""Node agent settings: one YAML file, parsed once, validated strictly into a frozen object.

Like the gateway's settings, every problem becomes one :class:`ConfigError` line naming the key
path, the bad value and what is allowed; ``${VAR}`` / ``${VAR:-default}`` are expanded from the
environment (so ``node_key: ${ROLE_MESH_NODE_KEY}`` keeps the secret out of the file).
``--host`` / ``--port`` on the command line override the keys of the same name before
validation, so the result is final. A knob the gateway has too has the gateway's name:
``limits.max_body_bytes``, ``timeouts.*``, ``probes.interval_s`` / ``probes.timeout_s``,
``proxy_url`` and ``health_path`` (``url`` is still accepted for ``proxy_url``).

Model paths that are relative are taken relative to the config file; a model that does not
exist or a ``llama-server`` that cannot be found is a config error too, reported before
anything starts.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AliasChoices, Field, model_validator

from ..common.config import (
    Closed,
    HttpUrl,
    Key,
    Limits,
    PositiveSeconds,
    Probes,
    Timeouts,
    expanded_mapping,
    load_yaml,
    validate,
)
from ..common.errors import ConfigError
from ..common.protocol import NodeId, Role
from ..common.tls import TlsSettings, apply_env

#: Environment variable naming the agent's config file (``--config``).
AGENT_CONFIG_ENV = "ROLE_MESH_AGENT_CONFIG"
#: Where to find ``llama-server`` when a role names no ``binary`` (shared with scripts/llama_server.sh).
LLAMA_SERVER_ENV = "ROLE_MESH_LLAMA_SERVER"
#: ``ROLE_MESH_AGENT_TLS_CERT_FILE`` ... override the ``tls:`` keys (the ``--tls-*`` options set them).
TLS_ENV_PREFIX = "ROLE_MESH_AGENT"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8091
#: Slots and prompt-cache RAM a llama-server gets unless the role says otherwise (README
#: "Cache-aware routing": several conversations stay cached per node).
DEFAULT_SLOTS = 4
DEFAULT_PROMPT_CACHE_MIB = 2048
#: Arguments the agent sets itself; a role may not pass them in ``args``.
_RESERVED_ARGS = ("--host", "--port", "-m", "--model")


def _check_args(args: tuple[str, ...]) -> tuple[str, ...]:
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in _RESERVED_ARGS:
            raise ValueError(
                f"must not contain {flag!r}: the agent sets --host 127.0.0.1, a free --port and "
                "-m <model> itself"
            )
    return args


class LlamaServerSpec(Closed):
    """A ``llama-server`` the agent starts and supervises for one role."""

    model: Annotated[str, Field(min_length=1)]
    args: Annotated[tuple[str, ...], AfterValidator(_check_args)] = ()
    binary: Annotated[str, Field(min_length=1)] | None = None
    #: Start it with ``--metrics``, so the agent's ``/metrics`` carries its ``llamacpp:*`` series.
    metrics: bool = True
    #: ``--parallel``: slots, i.e. conversations served at once, each keeping its prompt in the KV
    #: cache for its next turn (with ``--kv-unified``: the slots share the context, none shrinks).
    slots: Annotated[int, Field(ge=1, le=256)] | None = DEFAULT_SLOTS
    #: ``--cache-ram`` (MiB): host RAM where llama-server keeps idle slots' prompts, to restore
    #: one when its conversation comes back (llama-server's own default is 8192).
    prompt_cache_mib: Annotated[int, Field(ge=0, le=1_048_576)] | None = DEFAULT_PROMPT_CACHE_MIB
    #: ``always`` (started with the agent) or ``on_demand`` (started by the first request that
    #: needs it, stopped when idle or to make room under ``max_running``).
    start: Literal["always", "on_demand"] = "always"
    #: An on-demand server with nothing in flight for this long is stopped (none: only to make room).
    idle_unload_s: PositiveSeconds | None = None
    #: How long a load may take (and a request wait for room); default ``supervisor.load_timeout_s``.
    load_timeout_s: PositiveSeconds | None = None

    @model_validator(mode="after")
    def _on_demand_only(self) -> LlamaServerSpec:
        if self.idle_unload_s is not None and self.start != "on_demand":
            raise ValueError("'idle_unload_s' applies only with start: on_demand")
        return self


class RoleConfig(Closed):
    """One role: either ``llama_server`` (started by the agent) or ``url`` (already running)."""

    llama_server: LlamaServerSpec | None = None
    proxy_url: HttpUrl | None = Field(default=None, validation_alias=AliasChoices("proxy_url", "url"))
    #: Rewrite the request's ``model`` to this for a ``proxy_url`` server that checks it (vLLM).
    upstream_model: str | None = None
    health_path: str = "/health"
    #: For a ``proxy_url`` server started with ``--api-key``: sent as ``Authorization: Bearer``.
    api_key: Key | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> RoleConfig:
        if (self.llama_server is None) == (self.proxy_url is None):
            raise ValueError("give exactly one of 'llama_server' (the agent starts it) or 'proxy_url'")
        if self.upstream_model is not None and self.proxy_url is None:
            raise ValueError("'upstream_model' applies only to a 'proxy_url' role")
        if self.api_key is not None and self.proxy_url is None:
            raise ValueError("'api_key' applies only to a 'proxy_url' role")
        return self


class SupervisorSettings(Closed):
    """How ``llama-server`` children are started, watched, restarted and stopped."""

    load_timeout_s: PositiveSeconds = 600.0
    #: Consecutive failed probes of a running server before it is restarted.
    restart_after_failures: Annotated[int, Field(ge=1)] = 3
    stop_grace_s: PositiveSeconds = 10.0
    backoff_initial_s: PositiveSeconds = 1.0
    backoff_max_s: PositiveSeconds = 60.0


#: A name a certificate carries (DNS name or CN).
CertName = Annotated[str, Field(min_length=1)]


class AgentTls(TlsSettings):
    """The agent's ``tls:`` section: the shared keys, plus who may call it by certificate."""

    #: With ``client_ca_file``: only a client certificate that names one of these (a DNS
    #: subjectAltName or the subject CN) may call the agent; others get 403, so that another
    #: node's certificate from the same CA cannot use this node's models. Unset: any certificate
    #: of the CA.
    allowed_client_names: Annotated[tuple[CertName, ...], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _names_need_client_certificates(self) -> AgentTls:
        if self.allowed_client_names is not None and (
            self.client_ca_file is None or self.client_certs != "required"
        ):
            raise ValueError(
                "tls.allowed_client_names needs tls.client_ca_file with client_certs: required "
                "(the names are read from the client's certificate)"
            )
        return self


class AgentConfig(Closed):
    """The whole node agent configuration."""

    version: Literal[1] = 1
    node_id: NodeId
    gateway_url: HttpUrl
    node_key: Key | None = None
    host: Annotated[str, Field(min_length=1)] = DEFAULT_HOST
    port: Annotated[int, Field(ge=0, le=65535)] = DEFAULT_PORT  # 0: a free one, picked at start
    advertise_url: HttpUrl | None = None
    heartbeat_interval_s: PositiveSeconds = 10.0
    gateway_timeout_s: PositiveSeconds = 5.0
    roles: Annotated[dict[Role, RoleConfig], Field(min_length=1, max_length=32)]
    supervisor: SupervisorSettings = SupervisorSettings()
    #: How many llama-servers may run at once on this host (none: no limit); starting one more
    #: on demand stops the least recently used idle on-demand one first.
    max_running: Annotated[int, Field(ge=1)] | None = None
    probes: Probes = Probes(interval_s=5.0, timeout_s=5.0)
    limits: Limits = Limits()
    timeouts: Timeouts = Timeouts()
    tls: AgentTls = AgentTls()

    @model_validator(mode="after")
    def _advertise(self) -> AgentConfig:
        if self.advertise_url is None and self.host in ("0.0.0.0", "::", "[::]"):
            raise ValueError(
                f"advertise_url is required when host is {self.host}: "
                "give the URL the gateway should use to reach this agent"
            )
        if self.max_running is not None:
            always = [
                r for r, rc in self.roles.items() if rc.llama_server and rc.llama_server.start == "always"
            ]
            if len(always) > self.max_running:
                raise ValueError(
                    f"max_running: {self.max_running} is less than the {len(always)} roles that always "
                    f"run ({', '.join(always)}); raise it or give some 'start: on_demand'"
                )
        return self

    @property
    def base_url(self) -> str:
        """The URL the gateway is told to use for this node."""
        if self.advertise_url is not None:
            return self.advertise_url
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{'https' if self.tls.serving else 'http'}://{host}:{self.port}"


def resolve_binary(spec: LlamaServerSpec, env: Mapping[str, str]) -> str | None:
    """``binary`` if given, else ``$ROLE_MESH_LLAMA_SERVER``, else ``llama-server`` on PATH."""
    name = spec.binary or env.get(LLAMA_SERVER_ENV) or "llama-server"
    return shutil.which(name, path=env.get("PATH"))


def _preflight(cfg: AgentConfig, base: Path, env: Mapping[str, str]) -> AgentConfig:
    """Resolve model paths and binaries now, so a typo fails before anything listens."""
    roles: dict[str, RoleConfig] = {}
    for role, rc in cfg.roles.items():
        spec = rc.llama_server
        if spec is None:
            roles[role] = rc
            continue
        where = f"roles.{role}.llama_server"
        model = Path(spec.model).expanduser()
        model = model if model.is_absolute() else base / model
        if not model.is_file():
            raise ConfigError(f"{where}.model: {spec.model!r} is not a file (model paths are GGUF files)")
        binary = resolve_binary(spec, env)
        if binary is None:
            shown = spec.binary or env.get(LLAMA_SERVER_ENV) or "llama-server"
            raise ConfigError(
                f"{where}.binary: cannot find {shown!r} as an executable; set binary:, or "
                f"{LLAMA_SERVER_ENV}=/path/to/llama-server, or run 'bash scripts/llama_server.sh'"
            )
        new_spec = spec.model_copy(update={"model": str(model), "binary": binary})
        roles[role] = rc.model_copy(update={"llama_server": new_spec})
    return cfg.model_copy(update={"roles": roles})


def parse_config(
    data: Any,
    *,
    source: str = "config",
    base: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> AgentConfig:
    """Validate a parsed YAML tree (plus CLI ``overrides`` such as host/port)."""
    env = os.environ if env is None else env
    data = expanded_mapping(data, source, env, " (node_id, gateway_url, roles, ...)")
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    apply_env(data, env, TLS_ENV_PREFIX)
    cfg = validate(AgentConfig, data, source)
    try:
        return _preflight(cfg, base or Path.cwd(), env)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(
    path: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> AgentConfig:
    """Read and validate the agent's YAML file."""
    p = Path(path)
    return parse_config(load_yaml(p), source=str(p), base=p.parent.resolve(), env=env, overrides=overrides)
