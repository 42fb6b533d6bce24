"""The shared config pipeline: YAML file -> ${VAR} expansion -> pydantic -> one line per problem."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
from pydantic import Field, ValidationError

from rolemesh_gateway.common.config import (
    Closed,
    HttpUrl,
    Key,
    Name,
    PositiveSeconds,
    Timeouts,
    TimeoutsOverride,
    check_header_value,
    check_http_url,
    expand_env,
    expanded_mapping,
    is_loopback,
    load_yaml,
    one_line,
    validate,
)
from rolemesh_gateway.common.errors import ConfigError


# -- a small schema built from the same blocks as the real ones ---------------------------------
class Upstream(Closed):
    kind: Literal["upstream"]
    url: HttpUrl
    timeout_s: PositiveSeconds = 1.0


class Local(Closed):
    kind: Literal["local"]
    path: str


class Item(Closed):
    name: Name
    port: int = 80


LogLevel = Literal["critical", "error", "warning", "info", "debug"]


class Root(Closed):
    level: LogLevel = "info"
    keys: tuple[Key, ...] = ()
    items: list[Item] = []
    backends: dict[Name, Annotated[Upstream | Local, Field(discriminator="kind")]] = {}
    weights: dict[Name, int] = {}
    timeouts: Timeouts = Timeouts()


def problem(data: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        Root.model_validate(data)
    return one_line(info.value, Root)


# -- ${VAR} expansion ---------------------------------------------------------------------------
def test_expand_env_everywhere_in_the_tree() -> None:
    tree = {"a": "${HOST}:${PORT}", "b": ["x-${HOST}", {"c": "${PORT}"}], "n": 3, "t": True, "z": None}
    env = {"HOST": "10.0.0.1", "PORT": "8000"}
    assert expand_env(tree, env) == {
        "a": "10.0.0.1:8000",
        "b": ["x-10.0.0.1", {"c": "8000"}],
        "n": 3,
        "t": True,
        "z": None,
    }


def test_expand_env_defaults_and_what_is_left_alone() -> None:
    assert expand_env("${MISSING:-fallback}", {}) == "fallback"
    assert expand_env("${MISSING:-}", {}) == ""
    assert expand_env("${SET:-fallback}", {"SET": ""}) == ""  # set but empty is set
    assert expand_env("$HOME and ${ not a var } and $", {}) == "$HOME and ${ not a var } and $"
    assert expand_env("${A}${A}", {"A": "${B}"}) == "${B}${B}"  # values are not expanded again


def test_expand_env_unset_variable_names_the_key_path_and_the_fix() -> None:
    with pytest.raises(ConfigError) as info:
        expand_env({"auth": {"node_api_keys": ["${NODE_KEY}"]}}, {})
    assert str(info.value) == (
        "auth.node_api_keys[0]: environment variable NODE_KEY is not set "
        "(set it, or write ${NODE_KEY:-default})"
    )
    with pytest.raises(ConfigError, match=r"^<root>: environment variable X"):
        expand_env("${X}", {})


def test_expanded_mapping_wants_a_mapping_and_prefixes_the_source() -> None:
    assert expanded_mapping({"k": "${V}"}, "f.yaml", {"V": "v"}, "") == {"k": "v"}
    with pytest.raises(ConfigError, match=r"^f\.yaml: the file must be a YAML mapping with version: 1$"):
        expanded_mapping(["a", "list"], "f.yaml", {}, " with version: 1")
    with pytest.raises(ConfigError, match=r"^f\.yaml: the file must be a YAML mapping"):
        expanded_mapping(None, "f.yaml", {}, "")  # an empty file
    with pytest.raises(ConfigError, match=r"^f\.yaml: k: environment variable V is not set"):
        expanded_mapping({"k": "${V}"}, "f.yaml", {}, "")


# -- reading the file ---------------------------------------------------------------------------
def test_load_yaml_reads_a_file(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("version: 1\nmodels:\n  a: {type: proxy}\n")
    assert load_yaml(p) == {"version": 1, "models": {"a": {"type": "proxy"}}}


def test_load_yaml_missing_file_is_one_line(tmp_path: Path) -> None:
    p = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_yaml(p)
    assert str(info.value) == f"{p}: cannot read config file (No such file or directory)"


def test_load_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("version: 1\nmodels:\n  a: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_yaml(p)
    msg = str(info.value)
    assert msg.startswith(f"{p}: not valid YAML at line ") and "column" in msg
    assert "\n" not in msg


def test_load_yaml_not_utf8_is_one_line(tmp_path: Path) -> None:
    p = tmp_path / "latin1.yaml"
    p.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_yaml(p)
    assert str(info.value).startswith(f"{p}: cannot read config file (")
    assert "\n" not in str(info.value)


def test_load_yaml_of_a_directory_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_yaml(tmp_path)


# -- validation as one line ---------------------------------------------------------------------
def test_validate_prefixes_the_source() -> None:
    assert validate(Root, {"level": "debug"}, "x.yaml").level == "debug"
    with pytest.raises(ConfigError) as info:
        validate(Root, {"levle": "debug"}, "x.yaml")
    assert str(info.value).startswith("x.yaml: levle: unknown key; allowed here: level, keys, items")


def test_unknown_key_lists_the_keys_allowed_there() -> None:
    assert (
        problem({"bogus": 1})
        == "bogus: unknown key; allowed here: level, keys, items, backends, weights, timeouts"
    )
    assert problem({"timeouts": {"conect_s": 1}}) == (
        "timeouts.conect_s: unknown key; allowed here: connect_s, first_byte_s, idle_s, total_s"
    )


def test_unknown_key_is_reported_before_the_missing_one_it_explains() -> None:
    # "nmae" is a typo of "name": saying "name is missing" would send the operator looking elsewhere.
    assert problem({"items": [{"nmae": "x"}]}) == "items.0.nmae: unknown key; allowed here: name, port"


def test_missing_key() -> None:
    assert problem({"items": [{"port": 1}]}) == "items.0.name: required key is missing"
    assert problem({"backends": {"b": {"kind": "upstream"}}}) == "backends.b.url: required key is missing"


def test_literal_names_what_is_allowed() -> None:
    assert problem({"level": "loud"}) == (
        "level: got 'loud'; input should be 'critical', 'error', 'warning', 'info' or 'debug'"
    )


def test_wrong_type_and_bounds_show_the_value() -> None:
    assert problem({"items": [{"name": "a"}, {"name": "b", "port": "http"}]}).startswith(
        "items.1.port: got 'http'; input should be a valid integer"
    )
    assert problem({"timeouts": {"idle_s": 0}}) == "timeouts.idle_s: got 0; input should be greater than 0"


def test_value_error_shows_the_value_then_the_rule() -> None:
    assert problem({"backends": {"b": {"kind": "upstream", "url": "ftp://x"}}}) == (
        "backends.b.url: 'ftp://x' must be an http:// or https:// URL with a host, e.g. http://127.0.0.1:8011"
    )


def test_tagged_union_path_leaves_out_the_tag() -> None:
    # pydantic's location is backends.b.upstream.timeout_s; the operator's file has no "upstream" key.
    assert problem({"backends": {"b": {"kind": "upstream", "url": "http://x", "timeout_s": -1}}}) == (
        "backends.b.timeout_s: got -1; input should be greater than 0"
    )
    assert problem({"backends": {"b": {"kind": "local", "path": "/x", "url": "http://x"}}}) == (
        "backends.b.url: unknown key; allowed here: kind, path"
    )


def test_unknown_tag_lists_the_tags() -> None:
    assert (
        problem({"backends": {"b": {"kind": "remote"}}})
        == "backends.b.kind: got 'remote'; allowed: upstream, local"
    )


def test_missing_tag_lists_the_tags() -> None:
    msg = problem({"backends": {"b": {"url": "http://x"}}})
    assert msg.startswith("backends.b.kind: ")
    assert "upstream" in msg and "local" in msg, msg


def test_dict_key_errors_name_the_key() -> None:
    msg = problem({"backends": {"bad name": {"kind": "local", "path": "/x"}}})
    assert msg.startswith("backends.bad name: 'bad name' must be 1-64 characters")
    msg = problem({"weights": {"ok": 1, "-bad": 2}})
    assert msg.startswith("weights.-bad: '-bad' must be 1-64 characters")
    assert problem({"weights": {"ok": "heavy"}}).startswith(
        "weights.ok: got 'heavy'; input should be a valid integer"
    )


def test_container_values_are_not_echoed() -> None:
    assert problem({"items": {"name": "a"}}) == "items: input should be a valid list"
    assert problem({"timeouts": None}).startswith("timeouts: input should be a valid dictionary")


def test_problem_in_a_list_of_keys() -> None:
    assert problem({"keys": ["ok", "caf\u00e9"]}) == (
        "keys.1: 'caf\u00e9' must be printable ASCII without surrounding spaces "
        "(keys are sent in HTTP headers)"
    )


# -- the building blocks ------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["s\u00e9cret", "tab\tinside", "new\nline", " padded", "padded ", "\u2603"])
def test_check_header_value_refuses_what_cannot_go_in_a_header(key: str) -> None:
    with pytest.raises(ValueError, match="printable ASCII"):
        check_header_value(key)


def test_check_header_value_accepts_printable_ascii() -> None:
    assert check_header_value("sk-ABC_123.~!") == "sk-ABC_123.~!"
    assert check_header_value("inner space ok") == "inner space ok"


def test_check_http_url() -> None:
    assert check_http_url("http://127.0.0.1:8011/") == "http://127.0.0.1:8011"
    assert check_http_url("https://h.example/v1") == "https://h.example/v1"
    with pytest.raises(ValueError, match="is not a valid URL"):
        check_http_url("http://h:99999")
    with pytest.raises(ValueError, match="must not carry a query, fragment or credentials"):
        check_http_url("http://u:p@h")


def test_timeouts_override_keeps_unset_fields() -> None:
    base = Timeouts(connect_s=1, first_byte_s=2, idle_s=3, total_s=None)
    merged = TimeoutsOverride(idle_s=9).over(base)
    assert merged == Timeouts(connect_s=1, first_byte_s=2, idle_s=9, total_s=None)
    assert base.idle_s == 3  # the base is not changed


def test_sections_are_frozen_and_closed() -> None:
    t = Timeouts()
    with pytest.raises(ValidationError):
        t.idle_s = 1  # type: ignore[misc]
    with pytest.raises(ValidationError):
        Timeouts.model_validate({"idle": 1})


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.1", "::1", "[::1]", "localhost"])
def test_is_loopback_yes(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.1", "example.com", "localhost.evil.com", ""])
def test_is_loopback_no(host: str) -> None:
    assert not is_loopback(host)
