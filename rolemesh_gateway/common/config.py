"""The config pipeline both programs share: YAML file -> ``${VAR}`` expansion -> pydantic -> one line.

Each program declares its schema (:mod:`rolemesh_gateway.gateway.settings`,
:mod:`rolemesh_gateway.agent.config`) from the building blocks here and calls
:func:`load_yaml` and :func:`validate`; every problem, whatever its source (a missing file, bad
YAML, an unset variable, a value pydantic refuses), becomes one :class:`ConfigError` line that
names the file, the key path, the bad value and what is allowed.
"""

from __future__ import annotations

import ipaddress
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin
from urllib.parse import urlsplit

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError

#: Environment variable meaning --allow-insecure-bind, for both programs.
INSECURE_ENV = "ROLE_MESH_ALLOW_INSECURE_BIND"

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")

M = TypeVar("M", bound=BaseModel)


# -- building blocks of both schemas ---------------------------------------------------------
class Closed(BaseModel):
    """A frozen config section in which unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def check_http_url(value: str) -> str:
    """Accept only ``http(s)://host[:port][/path]`` URLs; return them without a trailing slash.

    The raw string is checked too: ``urlsplit`` silently drops tabs and line breaks, which would
    otherwise be stored, listed and logged as they came (a forged log line).
    """
    if any(c <= " " or c == "\x7f" for c in value):
        raise ValueError("must not contain spaces or control characters")
    try:
        parts = urlsplit(value)
        port = parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host, e.g. http://127.0.0.1:8011")
    if parts.query or parts.fragment or parts.username or parts.password or "@" in parts.netloc:
        raise ValueError("must not carry a query, fragment or credentials")
    try:
        parts.hostname.encode("idna")
    except UnicodeError:
        raise ValueError("has a host name that cannot be written in ASCII (IDNA)") from None
    if not parts.path.isascii():
        raise ValueError("must have an ASCII path (percent-encode the rest)")
    del port
    return value.rstrip("/")


def check_name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(
            "must be 1-64 characters of letters, digits, '.', '_', ':' or '-', "
            "starting with a letter or digit"
        )
    return value


def check_header_value(value: str) -> str:
    """Keys travel in HTTP headers: printable ASCII only, so none fails at run time."""
    if not value.isascii() or not value.isprintable() or value != value.strip():
        raise ValueError("must be printable ASCII without surrounding spaces (keys are sent in HTTP headers)")
    return value


HttpUrl = Annotated[str, AfterValidator(check_http_url)]
Name = Annotated[str, AfterValidator(check_name)]
PositiveSeconds = Annotated[float, Field(gt=0)]
Key = Annotated[str, Field(min_length=1), AfterValidator(check_header_value)]


class NamedKey(BaseModel):
    """A key with a name: the name (never the key) appears in metrics and logs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, AfterValidator(lambda v: check_name(v))]
    key: Key


#: A key as written in the config: a plain string (named after its hash) or ``{name, key}``.
KeyEntry = Key | NamedKey


class Timeouts(Closed):
    """Timeouts in seconds for talking to an upstream. ``total_s`` null means no overall limit."""

    connect_s: PositiveSeconds = 5.0
    first_byte_s: PositiveSeconds = 300.0
    idle_s: PositiveSeconds = 120.0
    total_s: PositiveSeconds | None = None


class TimeoutsOverride(Closed):
    """Timeouts for one alias or role; unset fields fall back to the top-level ``timeouts``."""

    connect_s: PositiveSeconds | None = None
    first_byte_s: PositiveSeconds | None = None
    idle_s: PositiveSeconds | None = None
    total_s: PositiveSeconds | None = None

    def over(self, base: Timeouts) -> Timeouts:
        given = {k: v for k, v in self.model_dump().items() if v is not None}
        return base.model_copy(update=given)


def bearer_header(key: str | None) -> list[tuple[bytes, bytes]]:
    """``Authorization: Bearer <key>`` for an upstream started with ``--api-key``; none without."""
    return [(b"authorization", b"Bearer " + key.encode("ascii"))] if key else []


class Limits(Closed):
    """Bounds on what a client may send and hold (the server side of both programs).

    All but ``max_body_bytes`` and ``write_timeout_s`` are enforced by the programs' own HTTP
    protocol (:mod:`rolemesh_gateway.common.server`), so they hold under ``rolemesh-gateway``
    and ``rolemesh-node-agent``, not under a bare ``uvicorn`` command.
    """

    max_body_bytes: Annotated[int, Field(gt=0)] = 16 * 1024 * 1024
    #: A request line and headers larger than this get 431 and the connection is closed.
    max_head_bytes: Annotated[int, Field(ge=1024, le=16 * 1024 * 1024)] = 64 * 1024
    #: Seconds a client has to send a whole request head, from the connection or the request's start.
    head_timeout_s: PositiveSeconds = 10.0
    #: Open client connections at most (and never more than half the process's file descriptors).
    max_connections: Annotated[int, Field(ge=1)] = 1024
    #: An idle keep-alive connection is closed after this long.
    keepalive_s: PositiveSeconds = 5.0
    #: A stream whose client reads nothing for this long is ended (its node slot is freed).
    write_timeout_s: PositiveSeconds = 60.0


class Probes(Closed):
    """How an upstream's health path is probed."""

    interval_s: PositiveSeconds = 5.0
    timeout_s: PositiveSeconds = 2.0


# -- the pipeline ---------------------------------------------------------------------------
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


def load_yaml(path: str | os.PathLike[str]) -> Any:
    """Read and parse a YAML file; any failure is one :class:`ConfigError` line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"{p}: cannot read config file ({reason})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{p}: not valid YAML{where}: {problem}") from None


def expanded_mapping(data: Any, source: str, env: Mapping[str, str], hint: str) -> dict[str, Any]:
    """A parsed config file's top level, checked to be a mapping, with ``${VAR}`` expanded."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the file must be a YAML mapping{hint}")
    try:
        expanded: dict[str, Any] = expand_env(data, env)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return expanded


def validate(model: type[M], data: dict[str, Any], source: str) -> M:
    """``model.model_validate(data)``, with a failure turned into one line."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {one_line(exc, model)}") from None


def one_line(exc: ValidationError, root: type[BaseModel]) -> str:
    """The first problem of a validation error as ``key.path: what is wrong``.

    An unknown key goes first: it is usually a typo, and the "missing" error pydantic also
    reports for the key meant is then explained by it.
    """
    errors = exc.errors(include_url=False)
    # A key is a string or a mapping ({name, key, ...}): for a mapping, the string member's
    # "should be a valid string" says nothing; the mapping member's complaint is the one.
    useful = [e for e in errors if not (e["type"] == "string_type" and isinstance(e.get("input"), dict))]
    errors = useful or errors
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(err["loc"])
    kind, value = err["type"], err.get("input")
    msg = str(err["msg"]).removeprefix("Value error, ")
    holder, shown = _walk(root, loc[:-1])
    if loc:
        last = loc[-1]
        _, tail = _walk(holder, (last,)) if holder is not None else (None, [str(last)])
        shown += tail if last != "[key]" else []
    path = ".".join(shown)
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tag = str(err.get("ctx", {}).get("discriminator", "type")).strip("'")
        got = value.get(tag) if isinstance(value, dict) else value
        members = _walk(root, loc)[0]
        tags = [t for m in (members if isinstance(members, tuple) else ()) for t in _tags(m, tag)]
        return f"{path}.{tag}: got {got!r}; allowed: {', '.join(tags)}"
    if not path or msg.startswith(f"{path}."):  # a check across keys: its message names them
        return msg
    msg = msg[:1].lower() + msg[1:]  # it follows "path: " now
    if kind == "extra_forbidden":
        allowed_keys = list(holder.model_fields) if _is_model(holder) else []
        hint = f"; allowed here: {', '.join(allowed_keys)}" if allowed_keys else ""
        return f"{path}: unknown key{hint}"
    if kind == "missing":
        return f"{path}: required key is missing"
    if isinstance(value, dict | list | tuple) or value is None:
        return f"{path}: {msg}"
    if kind == "value_error":
        return f"{path}: {value!r} {msg}"
    return f"{path}: got {value!r}; {msg}"


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _unwrap(tp: Any) -> Any:
    """Strip ``Annotated`` and ``None`` from an annotation; a union of several stays a union."""
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if get_origin(tp) in (typing.Union, types.UnionType):
        members = [a for a in get_args(tp) if a is not type(None)]
        if len(members) == 1:
            return _unwrap(members[0])
        return tuple(_unwrap(a) for a in members)
    return tp


def _walk(tp: Any, loc: tuple[Any, ...]) -> tuple[Any, list[str]]:
    """Follow a pydantic error location through annotations.

    Returns what the location points at (a model class when it is one) and the key path to
    show, without the union tags pydantic inserts (``models.p.proxy.url`` -> ``models.p.url``).
    """
    shown: list[str] = []
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, tuple):  # a tagged union: ``part`` is the tag that picked the member
            models = [m for m in tp if _is_model(m)]
            tp = next((m for m in models if m.__name__ == part), None) or next(
                (m for m in models if _has_tag(m, part)), None
            )
            continue
        shown.append(str(part))
        if _is_model(tp):
            field = tp.model_fields.get(str(part))
            tp = field.annotation if field is not None else None
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1]
        elif get_origin(tp) in (list, tuple):
            tp = get_args(tp)[0]
        else:
            tp = None
    return _unwrap(tp), shown


def _tags(model: Any, field_name: str) -> list[str]:
    """The values a tagged-union member's discriminator field accepts."""
    field = model.model_fields.get(field_name) if _is_model(model) else None
    if field is None or get_origin(field.annotation) is not Literal:
        return []
    return [str(v) for v in get_args(field.annotation)]


def _has_tag(model: type[BaseModel], tag: object) -> bool:
    for field in model.model_fields.values():
        if get_origin(field.annotation) is Literal and tag in get_args(field.annotation):
            return True
    return False


# -- binding --------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
