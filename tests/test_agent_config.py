"""Node agent config: the example loads; every mistake is one line naming the key."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from rolemesh_gateway.agent.config import load_config, parse_config
from rolemesh_gateway.common.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def base(**roles: Any) -> dict[str, Any]:
    return {
        "node_id": "gpu-1",
        "gateway_url": "http://127.0.0.1:8000",
        "node_key": "k",
        "roles": roles or {"planner": {"proxy_url": "http://127.0.0.1:8011"}},
    }


def error(data: Any, env: dict[str, str] | None = None, **overrides: object) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_config(data, source="agent.yaml", env=env or {"PATH": ""}, overrides=overrides)
    message = str(exc.value)
    assert "\n" not in message and message.startswith("agent.yaml: ")
    return message


def test_minimal_config_gets_the_documented_defaults() -> None:
    cfg = parse_config(base(), env={})
    assert (cfg.host, cfg.port) == ("127.0.0.1", 8091)
    assert cfg.base_url == "http://127.0.0.1:8091"
    assert cfg.heartbeat_interval_s == 10
    assert cfg.supervisor.stop_grace_s > 0 and cfg.supervisor.load_timeout_s > 0
    with pytest.raises(ValidationError):
        cfg.port = 1  # type: ignore[misc]


def test_cli_overrides_host_port_and_advertise_url_follows() -> None:
    cfg = parse_config(base(), env={}, overrides={"host": "10.0.0.12", "port": 9000})
    assert cfg.base_url == "http://10.0.0.12:9000"
    data = {**base(), "advertise_url": "http://gpu-1.lan:9000/"}
    assert parse_config(data, env={}).base_url == "http://gpu-1.lan:9000"


def test_node_key_from_environment() -> None:
    data = {**base(), "node_key": "${ROLE_MESH_NODE_KEY}"}
    assert parse_config(data, env={"ROLE_MESH_NODE_KEY": "s3cret"}).node_key == "s3cret"
    assert "node_key: environment variable ROLE_MESH_NODE_KEY is not set" in error(data)


def test_llama_server_role_resolves_model_and_binary(fake_files: dict[str, str], tmp_path: Path) -> None:
    role = {"llama_server": {"model": "m.gguf", "args": ["-c", "512"], "binary": fake_files["binary"]}}
    cfg = parse_config(base(planner=role), env={}, base=tmp_path)
    spec = cfg.roles["planner"].llama_server
    assert spec is not None
    assert spec.model == fake_files["model"] and spec.binary == fake_files["binary"]
    assert spec.args == ("-c", "512")


def test_binary_from_env_then_path(fake_files: dict[str, str]) -> None:
    role = {"llama_server": {"model": fake_files["model"]}}
    cfg = parse_config(base(p=role), env={"ROLE_MESH_LLAMA_SERVER": fake_files["binary"]})
    assert cfg.roles["p"].llama_server.binary == fake_files["binary"]  # type: ignore[union-attr]
    cfg = parse_config(base(p=role), env={"PATH": fake_files["dir"]})
    assert cfg.roles["p"].llama_server.binary == fake_files["binary"]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"bogus": 1}, "agent.yaml: bogus: unknown key; allowed here: version, node_id, gateway_url"),
        ({"node_id": "gpu 1"}, "agent.yaml: node_id: 'gpu 1' must be 1-128 printable"),
        ({"gateway_url": "gateway:8000"}, "agent.yaml: gateway_url: 'gateway:8000' must be an http://"),
        ({"port": 70000}, "agent.yaml: port: got 70000; input should be less than or equal to 65535"),
        (
            {"heartbeat_interval_s": 0},
            "agent.yaml: heartbeat_interval_s: got 0; input should be greater than 0",
        ),
        ({"roles": {}}, "agent.yaml: roles: dictionary should have at least 1 item"),
        (
            {"roles": {"bad role": {"url": "http://a"}}},
            "agent.yaml: roles.bad role: 'bad role' must be 1-64 characters",
        ),
        ({"roles": {"p": {}}}, "agent.yaml: roles.p: give exactly one of 'llama_server'"),
        (
            {"roles": {"p": {"url": "http://a", "llama_server": {"model": "x"}}}},
            "agent.yaml: roles.p: give exactly one of 'llama_server'",
        ),
        (
            {"roles": {"p": {"url": "http://a", "x": 1}}},
            "roles.p.x: unknown key; allowed here: llama_server, proxy_url",
        ),
        ({"supervisor": {"grace": 1}}, "supervisor.grace: unknown key; allowed here: load_timeout_s"),
        (
            {"timeouts": {"read_s": 1}},
            "agent.yaml: timeouts.read_s: unknown key; allowed here: connect_s",
        ),
        ({"version": 2}, "agent.yaml: version: got 2; input should be 1"),
        ({"node_id": None}, "agent.yaml: node_id: input should be a valid string"),
    ],
)
def test_mistakes_are_one_line_with_the_key_path(change: dict[str, Any], expected: str) -> None:
    assert expected in error({**base(), **change})


def test_missing_required_keys() -> None:
    assert (
        error({"node_id": "n", "roles": base()["roles"]})
        == "agent.yaml: gateway_url: required key is missing"
    )
    assert error(["not", "a", "mapping"]).startswith("agent.yaml: the file must be a YAML mapping")


def test_llama_server_mistakes(fake_files: dict[str, str]) -> None:
    missing = {"llama_server": {"model": "/nope/model.gguf", "binary": fake_files["binary"]}}
    assert error(base(p=missing)) == (
        "agent.yaml: roles.p.llama_server.model: '/nope/model.gguf' is not a file "
        "(model paths are GGUF files)"
    )
    no_binary = {"llama_server": {"model": fake_files["model"]}}
    msg = error(base(p=no_binary))
    assert msg.startswith("agent.yaml: roles.p.llama_server.binary: cannot find 'llama-server'")
    assert "ROLE_MESH_LLAMA_SERVER" in msg and "scripts/llama_server.sh" in msg
    for flag in ("--port", "--host=0.0.0.0", "-m"):
        reserved = {"llama_server": {"model": fake_files["model"], "args": [flag, "1"]}}
        shown = flag.split("=")[0]
        assert f"roles.p.llama_server.args: must not contain '{shown}': the agent sets" in error(
            base(p=reserved)
        )


def test_public_bind_needs_advertise_url() -> None:
    msg = error(base(), host="0.0.0.0")
    assert msg == (
        "agent.yaml: advertise_url is required when host is 0.0.0.0: "
        "give the URL the gateway should use to reach this agent"
    )


def test_yaml_errors_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "agent.yaml"
    bad.write_text("node_id: n\nroles: [\n")
    with pytest.raises(ConfigError, match=r"agent.yaml: not valid YAML at line 3"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"cannot read config file"):
        load_config(tmp_path / "missing.yaml")


def test_example_config_is_valid_apart_from_its_placeholder_paths(fake_files: dict[str, str]) -> None:
    """configs/node-agent.yaml documents every key; with real files in place it validates."""
    text = (ROOT / "configs" / "node-agent.yaml").read_text()
    text = text.replace("/models/planner-model.gguf", fake_files["model"])
    text = text.replace("/models/writer-model.gguf", fake_files["model"])
    path = Path(fake_files["dir"]) / "node-agent.yaml"
    path.write_text(text)
    env = {**os.environ, "ROLE_MESH_NODE_KEY": "k", "ROLE_MESH_LLAMA_SERVER": fake_files["binary"]}
    cfg = load_config(path, env=env)
    assert set(cfg.roles) == {"planner", "writer"} and cfg.node_key == "k"
    assert cfg.base_url == "http://127.0.0.1:8091"


def test_url_is_still_accepted_for_proxy_url() -> None:
    cfg = parse_config(base(coder={"url": "http://127.0.0.1:8013/"}), env={})
    assert cfg.roles["coder"].proxy_url == "http://127.0.0.1:8013"


def test_on_demand_settings_and_their_mistakes(fake_files: dict[str, str]) -> None:
    spec = {"model": fake_files["model"], "binary": fake_files["binary"]}
    on_demand = {"llama_server": {**spec, "start": "on_demand", "idle_unload_s": 300, "load_timeout_s": 60}}
    cfg = parse_config({**base(p=on_demand, q={"llama_server": spec}), "max_running": 1}, env={"PATH": ""})
    p = cfg.roles["p"].llama_server
    assert p is not None and (p.start, p.idle_unload_s, p.load_timeout_s) == ("on_demand", 300, 60)
    assert cfg.max_running == 1
    q = cfg.roles["q"].llama_server
    assert q is not None and (q.start, q.idle_unload_s) == ("always", None)  # as before by default
    assert error(base(p={"llama_server": {**spec, "idle_unload_s": 5}})) == (
        "agent.yaml: roles.p.llama_server: 'idle_unload_s' applies only with start: on_demand"
    )
    assert error(base(p={"llama_server": {**spec, "start": "lazy"}})) == (
        "agent.yaml: roles.p.llama_server.start: got 'lazy'; input should be 'always' or 'on_demand'"
    )
    two = base(p={"llama_server": spec}, q={"llama_server": spec})
    assert error({**two, "max_running": 1}) == (
        "agent.yaml: max_running: 1 is less than the 2 roles that always run (p, q); raise it or give "
        "some 'start: on_demand'"
    )
    assert "max_running: got 0" in error({**two, "max_running": 0})


def test_slots_and_prompt_cache_ram_defaults_overrides_and_limits(
    fake_files: dict[str, str], tmp_path: Path
) -> None:
    from rolemesh_gateway.agent.supervisor import llama_argv

    def argv(**spec: Any) -> list[str]:
        role = {"llama_server": {"model": "m.gguf", "binary": fake_files["binary"], **spec}}
        cfg = parse_config(base(planner=role), env={}, base=tmp_path)
        server = cfg.roles["planner"].llama_server
        assert server is not None
        return llama_argv(server, "planner", 9000)

    default = argv()
    assert default[default.index("--parallel") + 1] == "4"
    assert default[default.index("--cache-ram") + 1] == "2048"
    assert "--kv-unified" in default  # the slots share the context: none is cut to a quarter
    mine = argv(slots=8, prompt_cache_mib=512)
    assert mine[mine.index("--parallel") + 1] == "8" and mine[mine.index("--cache-ram") + 1] == "512"
    # The role's own flags win, and null leaves llama-server's defaults.
    given = argv(args=["-np", "2", "--cache-ram=0"])
    assert (
        "--parallel" not in given
        and "--kv-unified" not in given
        and given.count("--cache-ram=0") == 1
        and "-np" in given
    )
    assert "--parallel" not in argv(slots=None) and "--cache-ram" not in argv(prompt_cache_mib=None)
    assert "roles.p.llama_server.slots: got 0; input should be greater than or equal to 1" in error(
        base(p={"llama_server": {"model": fake_files["model"], "binary": fake_files["binary"], "slots": 0}})
    )


def test_allowed_client_names_need_required_client_certificates() -> None:
    assert error({**base(), "tls": {"allowed_client_names": ["gateway.lan"]}}) == (
        "agent.yaml: tls.allowed_client_names needs tls.client_ca_file with client_certs: required "
        "(the names are read from the client's certificate)"
    )
