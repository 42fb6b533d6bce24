"""Node agent settings: one YAML file, parsed once, validated strictly into a frozen object.

Like the gateway's settings, every problem becomes one :class:`ConfigError` line naming the key
path, the bad value and what is allowed; ``${VAR}`` / ``${VAR:-default}`` are expanded from the
environment (so ``node_key: ${ROLE_MESH_NODE_KEY}`` keeps the secret out of the file).
``--host`` / ``--port`` on the command line override the keys of the same name before
validation, so the result is final. Model paths that are relative are taken relative to the
config file; a model that does not exist or a ``llama-server`` that cannot be found is a config
error too, reported before anything starts.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..protocol import NodeId, Role
from ..settings import ConfigError, HttpUrl, PositiveSeconds, Timeouts, expanded_mapping

#: Where to find ``llama-server`` when a role names no ``binary`` (shared with scripts/llama_server.sh).
LLAMA_SERVER_ENV = "ROLE_MESH_LLAMA_SERVER"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8091
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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LlamaServerSpec(_Strict):
    """A ``llama-server`` the agent starts and supervises for one role."""

    model: Annotated[str, Field(min_length=1)]
    args: Annotated[tuple[str, ...], AfterValidator(_check_args)] = ()
    binary: Annotated[str, Field(min_length=1)] | None = None


class RoleConfig(_Strict):
    """One role: either ``llama_server`` (started by the agent) or ``url`` (already running)."""

    llama_server: LlamaServerSpec | None = None
    url: HttpUrl | None = None
    #: Rewrite the request's ``model`` to this for a ``url`` server that checks it (vLLM).
    upstream_model: str | None = None
    health_path: str = "/health"

    @model_validator(mode="after")
    def _exactly_one(self) -> RoleConfig:
        if (self.llama_server is None) == (self.url is None):
            raise ValueError("give exactly one of 'llama_server' (the agent starts it) or 'url'")
        if self.upstream_model is not None and self.url is None:
            raise ValueError("'upstream_model' applies only to a 'url' role")
        return self


class SupervisorSettings(_Strict):
    """How ``llama-server`` children are started, watched, restarted and stopped."""

    load_timeout_s: PositiveSeconds = 600.0
    health_interval_s: PositiveSeconds = 5.0
    health_timeout_s: PositiveSeconds = 5.0
    #: Consecutive failed health checks of a running server before it is restarted.
    unhealthy_after: Annotated[int, Field(ge=1)] = 3
    stop_grace_s: PositiveSeconds = 10.0
    backoff_initial_s: PositiveSeconds = 1.0
    backoff_max_s: PositiveSeconds = 60.0


class ProxySettings(_Strict):
    max_body_bytes: Annotated[int, Field(gt=0)] = 16 * 1024 * 1024
    timeouts: Timeouts = Timeouts()


class AgentConfig(_Strict):
    """The whole node agent configuration."""

    version: Literal[1] = 1
    node_id: NodeId
    gateway_url: HttpUrl
    node_key: Annotated[str, Field(min_length=1)] | None = None
    host: Annotated[str, Field(min_length=1)] = DEFAULT_HOST
    port: Annotated[int, Field(ge=1, le=65535)] = DEFAULT_PORT
    advertise_url: HttpUrl | None = None
    heartbeat_interval_s: PositiveSeconds = 10.0
    gateway_timeout_s: PositiveSeconds = 5.0
    roles: Annotated[dict[Role, RoleConfig], Field(min_length=1, max_length=32)]
    supervisor: SupervisorSettings = SupervisorSettings()
    proxy: ProxySettings = ProxySettings()

    @model_validator(mode="after")
    def _advertise(self) -> AgentConfig:
        if self.advertise_url is None and self.host in ("0.0.0.0", "::", "[::]"):
            raise ValueError(
                f"advertise_url is required when host is {self.host}: "
                "give the URL the gateway should use to reach this agent"
            )
        return self

    @property
    def base_url(self) -> str:
        """The URL the gateway is told to use for this node."""
        if self.advertise_url is not None:
            return self.advertise_url
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"http://{host}:{self.port}"


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


def _format_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    path = ".".join(str(p) for p in err["loc"]).replace(".[key]", "")
    kind, value = err["type"], err.get("input")
    msg = str(err["msg"]).removeprefix("Value error, ")
    if not path:  # a check across keys: its message names them
        return msg
    if kind == "extra_forbidden":
        return f"{path}: unknown key{_allowed_hint(err['loc'])}"
    if kind == "missing":
        return f"{path}: required key is missing"
    if isinstance(value, dict | list | tuple) or value is None:
        return f"{path}: {msg}"
    return f"{path}: got {value!r}; {msg}"


def _allowed_hint(loc: tuple[int | str, ...]) -> str:
    model: Any = AgentConfig
    for part in loc[:-1]:
        if model is AgentConfig and part == "roles":
            model = None  # next part is the role name
            continue
        if model is None:
            model = RoleConfig
            continue
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        options = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type)]
        model = next((a for a in options if issubclass(a, BaseModel)), None)
        if model is None:
            return ""
    return f"; allowed here: {', '.join(model.model_fields)}" if model is not None else ""


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
    try:
        cfg = AgentConfig.model_validate(data)
        return _preflight(cfg, base or Path.cwd(), env)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_format_error(exc)}") from None
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(
    path: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> AgentConfig:
    """Read and validate the agent's YAML file."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config file ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    return parse_config(data, source=str(p), base=p.parent.resolve(), env=env, overrides=overrides)
