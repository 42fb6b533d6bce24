"""Gateway settings: the YAML file named by ``ROLE_MESH_CONFIG``, parsed once, validated strictly.

The file becomes a frozen :class:`Settings` before anything listens. Every problem is reported
as one :class:`ConfigError` line that names the key path, the bad value and what is allowed.
``${VAR}`` and ``${VAR:-default}`` in string values are expanded from the environment so that
secrets can stay out of the file.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from .routing import STRATEGIES

#: Environment variable naming the config file (the guide's contract).
CONFIG_ENV = "ROLE_MESH_CONFIG"
#: Environment variable overriding ``nodes.stale_after_s`` (the guide's contract).
STALE_ENV = "ROLE_MESH_NODE_STALE_AFTER_S"
#: Environment variable meaning --allow-insecure-bind, for both programs.
INSECURE_ENV = "ROLE_MESH_ALLOW_INSECURE_BIND"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """A config problem, already phrased as one line for the operator."""


def check_http_url(value: str) -> str:
    """Accept only ``http(s)://host[:port][/path]`` URLs; return them without a trailing slash."""
    try:
        parts = urlsplit(value)
        port = parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host, e.g. http://127.0.0.1:8011")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("must not carry a query, fragment or credentials")
    del port
    return value.rstrip("/")


def check_name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(
            "must be 1-64 characters of letters, digits, '.', '_', ':' or '-', "
            "starting with a letter or digit"
        )
    return value


def check_strategy(value: str) -> str:
    if value not in STRATEGIES:
        raise ValueError(f"is not a known strategy; allowed: {', '.join(STRATEGIES)}")
    return value


HttpUrl = Annotated[str, AfterValidator(check_http_url)]
Name = Annotated[str, AfterValidator(check_name)]
PositiveSeconds = Annotated[float, Field(gt=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class Timeouts(_Strict):
    """Upstream timeouts in seconds. ``total_s`` null means no overall limit."""

    connect_s: PositiveSeconds = 5.0
    first_byte_s: PositiveSeconds = 300.0
    idle_s: PositiveSeconds = 120.0
    total_s: PositiveSeconds | None = None


class TimeoutsOverride(_Strict):
    """Per-alias timeouts; unset fields fall back to the top-level ``timeouts``."""

    connect_s: PositiveSeconds | None = None
    first_byte_s: PositiveSeconds | None = None
    idle_s: PositiveSeconds | None = None
    total_s: PositiveSeconds | None = None

    def over(self, base: Timeouts) -> Timeouts:
        given = {k: v for k, v in self.model_dump().items() if v is not None}
        return base.model_copy(update=given)


class QueueSettings(_Strict):
    """Waiting room for requests when every node of a role is at capacity."""

    max_size: Annotated[int, Field(ge=0)] = 100
    max_wait_s: PositiveSeconds = 30.0


class ProxyModel(_Strict):
    """An alias served by one fixed upstream URL."""

    type: Literal["proxy"]
    openai_model_name: Name | None = None
    proxy_url: HttpUrl
    upstream_model: str | None = None
    health_path: str = "/health"
    timeouts: TimeoutsOverride | None = None


class DiscoveredModel(_Strict):
    """An alias served by whichever registered nodes carry ``role`` and are fresh."""

    type: Literal["discovered"]
    openai_model_name: Name | None = None
    role: Name
    strategy: Annotated[str, AfterValidator(check_strategy)] = "round_robin"
    max_attempts: Annotated[int, Field(ge=1, le=10)] = 3
    timeouts: TimeoutsOverride | None = None
    queue: QueueSettings | None = None


ModelConfig = Annotated[ProxyModel | DiscoveredModel, Field(discriminator="type")]


class AuthSettings(_Strict):
    client_api_keys: tuple[Annotated[str, Field(min_length=1)], ...] = ()
    node_api_keys: tuple[Annotated[str, Field(min_length=1)], ...] = ()

    @model_validator(mode="after")
    def _keys_disjoint(self) -> AuthSettings:
        if set(self.client_api_keys) & set(self.node_api_keys):
            raise ValueError("a key may not be both a client key and a node key")
        return self


class LimitSettings(_Strict):
    max_body_bytes: Annotated[int, Field(gt=0)] = 16 * 1024 * 1024


class ProbeSettings(_Strict):
    interval_s: PositiveSeconds = 5.0
    timeout_s: PositiveSeconds = 2.0


class NodeSettings(_Strict):
    """Node registry behaviour; ``stale_after_s`` is overridden by ROLE_MESH_NODE_STALE_AFTER_S."""

    stale_after_s: PositiveSeconds = 30.0
    evict_after_s: PositiveSeconds = 3600.0
    max_nodes: Annotated[int, Field(gt=0)] = 10000
    #: Consecutive failures before a node is ejected, and how long the ejection lasts.
    eject_after_failures: Annotated[int, Field(ge=1)] = 3
    eject_for_s: PositiveSeconds = 10.0


class RegistrySettings(_Strict):
    """Where nodes are kept: ``memory`` (one gateway) or ``redis`` (shared by several)."""

    backend: Literal["memory", "redis"] = "memory"
    redis_url: str | None = None
    key_prefix: Name = "rolemesh"
    sync_interval_s: PositiveSeconds = 0.5

    @model_validator(mode="after")
    def _redis_needs_url(self) -> RegistrySettings:
        if self.backend == "redis":
            scheme = (self.redis_url or "").split("://", 1)[0]
            if scheme not in ("redis", "rediss", "unix"):
                raise ValueError("backend 'redis' needs redis_url, e.g. redis://127.0.0.1:6379/0")
        return self


class Settings(_Strict):
    """The whole gateway configuration (``version: 1``)."""

    version: Literal[1]
    default_model: str
    auth: AuthSettings = AuthSettings()
    models: Annotated[dict[Name, ModelConfig], Field(min_length=1)]
    timeouts: Timeouts = Timeouts()
    limits: LimitSettings = LimitSettings()
    probes: ProbeSettings = ProbeSettings()
    nodes: NodeSettings = NodeSettings()
    registry: RegistrySettings = RegistrySettings()
    queue: QueueSettings = QueueSettings()

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        names: dict[str, str] = {}
        for alias, model in self.models.items():
            for name in {alias, model.openai_model_name or alias}:
                other = names.setdefault(name, alias)
                if other != alias:
                    raise ValueError(
                        f"model name '{name}' is used by both '{other}' and '{alias}'; "
                        "aliases and openai_model_name values must be unique"
                    )
        if self.default_model not in names:
            raise ValueError(
                f"default_model '{self.default_model}' names no alias; allowed: {', '.join(self.models)}"
            )
        return self

    def advertised_name(self, alias: str) -> str:
        return self.models[alias].openai_model_name or alias

    def timeouts_for(self, alias: str) -> Timeouts:
        override = self.models[alias].timeouts
        return override.over(self.timeouts) if override else self.timeouts


def expand_env(value: Any, env: Mapping[str, str], path: str = "") -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string of a parsed YAML tree."""
    if isinstance(value, str):

        def sub(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(
                f"{path or '<root>'}: environment variable {name} is not set "
                f"(set it, or write ${{{name}:-default}})"
            )

        return _ENV_RE.sub(sub, value)
    if isinstance(value, dict):
        return {k: expand_env(v, env, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, env, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _allowed_keys(loc: tuple[int | str, ...]) -> list[str]:
    """The keys allowed in the mapping that holds ``loc[-1]`` (for 'unknown key' errors).

    ``loc`` is pydantic's raw location, with the discriminator tag after a model alias.
    """
    parents = loc[:-1]
    model: Any = Settings
    if len(parents) >= 3 and parents[0] == "models":
        model = {"proxy": ProxyModel, "discovered": DiscoveredModel}.get(str(parents[2]))
        parents = parents[3:]
    for part in parents:
        field = model.model_fields.get(str(part)) if model else None
        if field is None:
            return []
        ann = field.annotation
        candidates = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type)]
        model = next((a for a in candidates if issubclass(a, BaseModel)), None)
    return list(model.model_fields) if model else []


def _format_error(source: str, exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    loc = tuple(err["loc"])
    # Drop the discriminator tag pydantic inserts after a model alias (models.x.proxy.field).
    shown = [
        p for i, p in enumerate(loc) if not (i == 2 and loc[0] == "models" and p in ("proxy", "discovered"))
    ]
    path = ".".join(str(p) for p in shown) or "<root>"
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc)
        hint = f"; allowed here: {', '.join(allowed)}" if allowed else ""
        return f"{source}: {path}: unknown key{hint}"
    if kind == "missing":
        return f"{source}: {path}: required key is missing"
    if kind == "union_tag_invalid" or kind == "union_tag_not_found":
        got = value.get("type") if isinstance(value, dict) else value
        return f"{source}: {path}.type: got {got!r}; allowed: proxy, discovered"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if kind == "literal_error":
        return f"{source}: {path}: got {value!r}; {msg[0].lower()}{msg[1:]}"
    if isinstance(value, dict | list):
        return f"{source}: {path}: {msg}"
    return (
        f"{source}: {path}: {value!r} {msg}"
        if kind == "value_error"
        else f"{source}: {path}: got {value!r}; {msg}"
    )


def expanded_mapping(data: Any, source: str, env: Mapping[str, str], hint: str) -> dict[str, Any]:
    """A parsed config file's top level, checked to be a mapping, with ``${VAR}`` expanded."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the file must be a YAML mapping{hint}")
    try:
        expanded: dict[str, Any] = expand_env(data, env)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return expanded


def parse_settings(data: Any, *, source: str = "config", env: Mapping[str, str] | None = None) -> Settings:
    """Validate an already-parsed YAML tree; apply env expansion and env overrides."""
    env = os.environ if env is None else env
    data = expanded_mapping(data, source, env, " with version: 1 at the top")
    stale = env.get(STALE_ENV)
    if stale is not None and stale != "":
        try:
            stale_s = float(stale)
            if not stale_s > 0:
                raise ValueError
        except ValueError:
            raise ConfigError(f"{STALE_ENV}: got {stale!r}; must be a number of seconds > 0") from None
        nodes = dict(data.get("nodes") or {})
        nodes["stale_after_s"] = stale_s
        data["nodes"] = nodes
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(source, exc)) from None


def load_settings(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Read and validate the config file (``path`` or ``$ROLE_MESH_CONFIG``)."""
    env = os.environ if env is None else env
    if path is None:
        path = env.get(CONFIG_ENV)
        if not path:
            raise ConfigError(f"no config file: set {CONFIG_ENV}=path/to/models.yaml (or pass --config)")
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config file ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{p}: not valid YAML{where}: {problem}") from None
    return parse_settings(data, source=str(p), env=env)


def insecure_bind_allowed(flag: bool | None, env: Mapping[str, str] | None = None) -> bool:
    """``--allow-insecure-bind`` given, or ROLE_MESH_ALLOW_INSECURE_BIND set to 1/true/yes."""
    env = os.environ if env is None else env
    return bool(flag) or env.get(INSECURE_ENV, "").lower() in ("1", "true", "yes")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
