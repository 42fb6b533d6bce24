"""Gateway settings: the YAML file named by ``ROLE_MESH_CONFIG``, parsed once, validated strictly.

The file becomes a frozen :class:`Settings` before anything listens. Every problem is reported
as one :class:`ConfigError` line that names the key path, the bad value and what is allowed.
``${VAR}`` and ``${VAR:-default}`` in string values are expanded from the environment so that
secrets can stay out of the file.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator

from ..common.config import (
    Closed,
    HttpUrl,
    Key,
    KeyEntry,
    Limits,
    Name,
    NamedKey,
    PositiveSeconds,
    Probes,
    Timeouts,
    TimeoutsOverride,
    expanded_mapping,
    load_yaml,
    validate,
)
from ..common.errors import ConfigError
from ..common.tls import TlsSettings, apply_env
from .strategies import STRATEGIES

#: Environment variable naming the config file (the guide's contract).
CONFIG_ENV = "ROLE_MESH_CONFIG"
#: ``ROLE_MESH_TLS_CERT_FILE`` ... override the ``tls:`` keys (the ``--tls-*`` options set them).
TLS_ENV_PREFIX = "ROLE_MESH"
#: Environment variable overriding ``nodes.stale_after_s`` (the guide's contract).
STALE_ENV = "ROLE_MESH_NODE_STALE_AFTER_S"
#: At most this many aliases are tried after the one a client asked for (``fallbacks``).
MAX_FALLBACKS = 5


def check_network(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError("is not a network; write it as CIDR, e.g. 10.0.0.0/8 or 127.0.0.1/32") from None
    return value


def check_strategy(value: str) -> str:
    if value not in STRATEGIES:
        raise ValueError(f"is not a known strategy; allowed: {', '.join(STRATEGIES)}")
    return value


class QueueSettings(Closed):
    """Waiting room for requests when every node of a role is at capacity."""

    max_size: Annotated[int, Field(ge=0)] = 100
    max_wait_s: PositiveSeconds = 30.0


class CacheAwareSettings(Closed):
    """Thresholds of the ``cache_aware`` strategy (README "Cache-aware routing")."""

    #: Route to the node with the longest known prefix when it covers this share of the prompt.
    match_threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    #: Out of balance (then: least loaded) when the busiest node has this many more requests
    #: in flight than the idlest, and more than ``balance_rel`` times as many.
    balance_abs: Annotated[int, Field(ge=0)] = 32
    balance_rel: Annotated[float, Field(ge=1.0)] = 1.1
    #: Prefix keys remembered per role (one per block of prompt; about 150 bytes each).
    max_entries: Annotated[int, Field(ge=1, le=10_000_000)] = 65536
    #: Characters per block of prompt text (one key each).
    block_chars: Annotated[int, Field(ge=16, le=65536)] = 128
    #: A node is passed over for a prefix match or a session when taking the request would put
    #: more than this times the average in-flight count on it.
    load_factor: Annotated[float, Field(gt=1.0)] = 1.25


class ProxyModel(Closed):
    """An alias served by one fixed upstream URL."""

    type: Literal["proxy"]
    openai_model_name: Name | None = None
    proxy_url: HttpUrl
    upstream_model: str | None = None
    health_path: str = "/health"
    #: Sent to the upstream (requests and probes) as ``Authorization: Bearer``, for a server
    #: started with ``--api-key``; the client's own key never is.
    api_key: Key | None = None
    timeouts: TimeoutsOverride | None = None
    fallbacks: Annotated[tuple[Name, ...], Field(max_length=MAX_FALLBACKS)] = ()


class DiscoveredModel(Closed):
    """An alias served by whichever registered nodes carry ``role`` and are fresh."""

    type: Literal["discovered"]
    openai_model_name: Name | None = None
    role: Name
    strategy: Annotated[str, AfterValidator(check_strategy)] = "round_robin"
    max_attempts: Annotated[int, Field(ge=1, le=10)] = 3
    timeouts: TimeoutsOverride | None = None
    queue: QueueSettings | None = None
    fallbacks: Annotated[tuple[Name, ...], Field(max_length=MAX_FALLBACKS)] = ()
    cache_aware: CacheAwareSettings | None = None

    @model_validator(mode="after")
    def _cache_aware_only_with_its_strategy(self) -> DiscoveredModel:
        if self.cache_aware is not None and self.strategy != "cache_aware":
            raise ValueError(
                f"'cache_aware' settings need 'strategy: cache_aware' (this alias uses {self.strategy})"
            )
        return self


ModelConfig = Annotated[ProxyModel | DiscoveredModel, Field(discriminator="type")]


class RateLimit(Closed):
    """A client key's budgets per minute (fixed 60 s windows, see :mod:`.limits`)."""

    requests_per_minute: Annotated[int, Field(gt=0)] | None = None
    tokens_per_minute: Annotated[int, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> RateLimit:
        if self.requests_per_minute is None and self.tokens_per_minute is None:
            raise ValueError("set requests_per_minute, tokens_per_minute or both")
        return self


class ClientKey(NamedKey):
    """A named client key, optionally with its own limits and the models it may use."""

    rate_limit: RateLimit | None = None
    #: Requests of this key in flight at once (a stream counts until it ends); more get 429.
    max_concurrent: Annotated[int, Field(gt=0)] | None = None
    #: The aliases (or their openai_model_name) this key may see and use; none: all of them.
    models: Annotated[tuple[Name, ...], Field(min_length=1)] | None = None


class AuthSettings(Closed):
    client_api_keys: tuple[Key | ClientKey, ...] = ()
    node_api_keys: tuple[KeyEntry, ...] = ()
    #: Keys for operator endpoints (/metrics, GET /v1/nodes, ...); none: client keys do.
    admin_api_keys: tuple[KeyEntry, ...] = ()

    @model_validator(mode="after")
    def _keys_disjoint(self) -> AuthSettings:
        def values(keys: tuple[KeyEntry, ...]) -> set[str]:
            return {k.key if isinstance(k, NamedKey) else k for k in keys}

        clients, nodes, admins = (
            values(self.client_api_keys),
            values(self.node_api_keys),
            values(self.admin_api_keys),
        )
        if clients & nodes or admins & nodes:
            raise ValueError("a key may not be both a node key and a client or admin key")
        if clients & admins:
            raise ValueError("a key may not be both a client key and an admin key")
        named = [k.key for k in self.client_api_keys if isinstance(k, NamedKey)]
        plain = [k for k in self.client_api_keys if not isinstance(k, NamedKey)]
        if len(set(named)) != len(named) or set(named) & set(plain):  # which name and limits apply?
            raise ValueError("auth.client_api_keys: a named key's key is listed twice")
        for kind, keys in (("client", self.client_api_keys), ("node", self.node_api_keys)):
            names = [k.name for k in keys if isinstance(k, NamedKey)]
            if len(names) != len(set(names)):
                raise ValueError(f"two {kind} keys have the same name")
        return self


class NodeSettings(Closed):
    """Node registry behaviour; ``stale_after_s`` is overridden by ROLE_MESH_NODE_STALE_AFTER_S."""

    stale_after_s: PositiveSeconds = 30.0
    evict_after_s: PositiveSeconds = 3600.0
    max_nodes: Annotated[int, Field(gt=0)] = 10000
    #: Consecutive failures before a node is ejected, and how long the ejection lasts.
    eject_after_failures: Annotated[int, Field(ge=1)] = 3
    eject_for_s: PositiveSeconds = 10.0
    #: A node that fails again right after an ejection is ejected again for twice as long,
    #: up to this.
    eject_max_s: PositiveSeconds = 300.0
    #: How many nodes one node key may register (none: only ``max_nodes`` bounds it).
    max_nodes_per_key: Annotated[int, Field(gt=0)] | None = None
    #: Where a node's ``base_url`` may point (CIDRs), checked at registration and again at connect
    #: time. Unset: anywhere but link-local, unspecified and multicast addresses.
    allowed_networks: tuple[Annotated[str, AfterValidator(check_network)], ...] | None = None
    #: What proves a node's identity at registration, heartbeat and deregistration: its node
    #: key, its client certificate (which must name its node_id: needs tls.client_ca_file), or both.
    identity: Literal["key", "certificate", "both"] = "key"
    #: Connect to a node only if its https certificate names its node_id (not its URL's host).
    verify_server_names: bool = False


class RegistrySettings(Closed):
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


class CorsSettings(Closed):
    """Which browser origins may call the gateway (``["*"]`` for any); none by default."""

    allow_origins: tuple[Annotated[str, Field(min_length=1)], ...] = ()


class Settings(Closed):
    """The whole gateway configuration (``version: 1``)."""

    version: Literal[1]
    default_model: str
    auth: AuthSettings = AuthSettings()
    models: Annotated[dict[Name, ModelConfig], Field(min_length=1)]
    timeouts: Timeouts = Timeouts()
    limits: Limits = Limits()
    probes: Probes = Probes()
    nodes: NodeSettings = NodeSettings()
    registry: RegistrySettings = RegistrySettings()
    queue: QueueSettings = QueueSettings()
    cors: CorsSettings = CorsSettings()
    tls: TlsSettings = TlsSettings()

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        if self.nodes.identity != "key" and not self.tls.mutual:
            raise ValueError(
                f"nodes.identity: {self.nodes.identity} needs tls.cert_file and tls.client_ca_file "
                "(nodes prove who they are with a client certificate, which only mutual TLS asks for)"
            )
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
        for alias in self.models:
            self.fallback_chain(alias)  # refuses unknown aliases, cycles, chains too long
        for i, key in enumerate(self.auth.client_api_keys):
            for j, name in enumerate(key.models or () if isinstance(key, ClientKey) else ()):
                if name not in names:
                    raise ValueError(
                        f"auth.client_api_keys.{i}.models.{j}: '{name}' names no alias; "
                        f"allowed: {', '.join(self.models)}"
                    )
        return self

    def fallback_chain(self, alias: str) -> tuple[str, ...]:
        """The aliases tried, in order, when ``alias`` cannot serve a request.

        Its ``fallbacks`` in order, each followed by its own fallbacks (depth first), each
        alias once. ValueError names a cycle, an unknown alias or a chain longer than
        :data:`MAX_FALLBACKS`.
        """
        chain: list[str] = []

        def walk(at: str, path: list[str]) -> None:
            for nxt in self.models[at].fallbacks:
                if nxt not in self.models:
                    raise ValueError(
                        f"models.{at}.fallbacks: '{nxt}' names no alias; allowed: {', '.join(self.models)}"
                    )
                if nxt in path:
                    raise ValueError(f"models.{alias}.fallbacks: cycle {' -> '.join([*path, nxt])}")
                if nxt in chain:
                    continue
                chain.append(nxt)
                if len(chain) > MAX_FALLBACKS:
                    raise ValueError(
                        f"models.{alias}.fallbacks: the chain {' -> '.join([alias, *chain])} tries more "
                        f"than {MAX_FALLBACKS} aliases after '{alias}'; shorten it"
                    )
                walk(nxt, [*path, nxt])

        walk(alias, [alias])
        return tuple(chain)

    def client_models(self, key: ClientKey) -> tuple[str, ...] | None:
        """The aliases a client key may use, in its order (None: every alias)."""
        if key.models is None:
            return None
        aliases = {name: a for a in self.models for name in (a, self.advertised_name(a))}
        return tuple(dict.fromkeys(aliases[name] for name in key.models))

    @property
    def default_alias(self) -> str:
        """The alias ``default_model`` names (it may name it by its ``openai_model_name``)."""
        if self.default_model in self.models:
            return self.default_model
        return next(a for a in self.models if self.advertised_name(a) == self.default_model)

    def advertised_name(self, alias: str) -> str:
        return self.models[alias].openai_model_name or alias

    def timeouts_for(self, alias: str) -> Timeouts:
        override = self.models[alias].timeouts
        return override.over(self.timeouts) if override else self.timeouts


def parse_settings(data: Any, *, source: str = "config", env: Mapping[str, str] | None = None) -> Settings:
    """Validate an already-parsed YAML tree; apply env expansion and env overrides."""
    env = os.environ if env is None else env
    data = expanded_mapping(data, source, env, " with version: 1 at the top")
    apply_env(data, env, TLS_ENV_PREFIX)
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
    return validate(Settings, data, source)


def load_settings(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Read and validate the config file (``path`` or ``$ROLE_MESH_CONFIG``)."""
    env = os.environ if env is None else env
    if path is None:
        path = env.get(CONFIG_ENV)
        if not path:
            raise ConfigError(f"no config file: set {CONFIG_ENV}=path/to/models.yaml (or pass --config)")
    return parse_settings(load_yaml(path), source=str(path), env=env)
