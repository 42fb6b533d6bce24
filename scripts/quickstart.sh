#!/usr/bin/env bash
# RoleMesh quick start: from a fresh clone to a gateway answering the guide's smoke test.
#
#   bash scripts/quickstart.sh                  set up, start, smoke-test, keep running (Ctrl-C stops)
#   bash scripts/quickstart.sh --smoke          ... and stop after the smoke test (CI, tests)
#   bash scripts/quickstart.sh --model X.gguf   serve your own GGUF instead of the tiny test model
#
# What it does: creates .venv and installs the project (first run only); finds or builds the real
# llama.cpp llama-server (scripts/llama_server.sh: cached, ~4 minutes to build once); writes a
# tiny random-weight model unless you give one; writes configs into .rolemesh/; starts a node
# agent serving the roles planner and writer from that model, and the gateway on 127.0.0.1:8000
# with `type: discovered` aliases; waits until every alias is available; runs the guide's two
# smoke-test curls.
#
# Environment: ROLE_MESH_QUICKSTART_MODEL (same as --model), ROLE_MESH_LLAMA_SERVER (use this
# llama-server), ROLE_MESH_CACHE_DIR (cache, default ~/.cache/rolemesh),
# ROLE_MESH_QUICKSTART_TIMEOUT (seconds to wait for every alias, default 300).
set -euo pipefail

SMOKE=0
MODEL="${ROLE_MESH_QUICKSTART_MODEL:-}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --smoke) SMOKE=1 ;;
        --model) [[ $# -ge 2 ]] || { echo "--model needs a path to a .gguf file" >&2; exit 2; }
                 MODEL="$2"; shift ;;
        --model=*) MODEL="${1#--model=}" ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done
if [[ -n "$MODEL" ]]; then   # relative to where the user ran the command, before the cd below
    [[ -f "$MODEL" ]] || { echo "quickstart: model file not found: $MODEL" >&2; exit 1; }
    MODEL="$(cd "$(dirname "$MODEL")" && pwd)/$(basename "$MODEL")"
fi
cd "$(dirname "$0")/.."

STATE=.rolemesh
CACHE="${ROLE_MESH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rolemesh}"
GATEWAY_PORT=8000   # the guide's port
AGENT_PORT=8091     # the node agent's default port
CLIENT_KEY=change-me-client-key
READY_TIMEOUT="${ROLE_MESH_QUICKSTART_TIMEOUT:-300}"
STARTED=$SECONDS

step() { printf '\n==> %s\n' "$*"; }
die() { printf '\nquickstart: ERROR: %s\n' "$*" >&2; exit 1; }

# -- 1. Python environment ---------------------------------------------------------------------
command -v curl >/dev/null || die "curl is needed for the smoke test (apt-get install curl)"
if [[ ! -x .venv/bin/python ]]; then
    command -v python3 >/dev/null || die "python3 (3.11 or newer) is needed"
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "python3 is $(python3 -V 2>&1); RoleMesh needs 3.11 or newer"
    step "creating .venv"
    python3 -m venv .venv
fi
if ! .venv/bin/python -c "import rolemesh_gateway, gguf, uvicorn" 2>/dev/null \
   || [[ pyproject.toml -nt .venv/.installed ]]; then
    step "installing RoleMesh and its tools into .venv (about a minute the first time)"
    mkdir -p "$STATE"
    if ! .venv/bin/pip install -q --disable-pip-version-check -e '.[dev]' > "$STATE/pip.log" 2>&1; then
        tail -n 30 "$STATE/pip.log" >&2
        die "pip install failed (full log: $STATE/pip.log)"
    fi
    touch .venv/.installed
fi

# -- 2. llama-server and a model -----------------------------------------------------------------
step "finding llama-server (builds it once if needed: about 4 minutes, progress below)"
LLAMA_SERVER="$(bash scripts/llama_server.sh | tail -n1)"
echo "    $LLAMA_SERVER"

if [[ -n "$MODEL" ]]; then
    ARGS='["-c", "4096", "-n", "256"]'
    step "serving your model $MODEL (one llama-server per role: it is loaded twice)"
else
    MODEL="$CACHE/models/tiny-llama.gguf"
    if [[ ! -f "$MODEL" ]]; then
        step "writing the tiny random-weight test model (a few seconds)"
        mkdir -p "$(dirname "$MODEL")"
        .venv/bin/python scripts/make_tiny_model.py --out "$MODEL"   # writes atomically
    fi
    # Random weights never say "stop": -n bounds each answer. chatml: the model has no template.
    ARGS='["-c", "512", "-n", "48", "-t", "1", "--chat-template", "chatml"]'
    step "serving the tiny test model (random weights: real tokens, nonsense text) $MODEL"
fi

# -- 3. configs ------------------------------------------------------------------------------------
for port in "$GATEWAY_PORT" "$AGENT_PORT"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        die "port $port is already in use (see: ss -ltnp 'sport = :$port'); stop that program first"
    fi
done
mkdir -p "$STATE"
chmod 700 "$STATE"
if [[ ! -s "$STATE/node-key" ]]; then
    .venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(24))' > "$STATE/node-key"
    chmod 600 "$STATE/node-key"
fi
ROLE_MESH_NODE_KEY="$(cat "$STATE/node-key")"
export ROLE_MESH_NODE_KEY   # both configs read it as ${ROLE_MESH_NODE_KEY}: no secret in files

cat > "$STATE/models.yaml" <<EOF
# Written by scripts/quickstart.sh: the gateway, with roles served by discovered nodes.
version: 1
default_model: planner
auth:
  client_api_keys:
    - "$CLIENT_KEY"
  node_api_keys:
    - "\${ROLE_MESH_NODE_KEY}"
models:
  planner:
    type: discovered
    openai_model_name: planner
    role: planner
  writer:
    type: discovered
    openai_model_name: writer
    role: writer
EOF

cat > "$STATE/node-agent.yaml" <<EOF
# Written by scripts/quickstart.sh: one node agent serving two roles from one model.
version: 1
node_id: quickstart-node
gateway_url: http://127.0.0.1:$GATEWAY_PORT
node_key: \${ROLE_MESH_NODE_KEY}
host: 127.0.0.1
port: $AGENT_PORT
heartbeat_interval_s: 5
roles:
  planner:
    llama_server: {model: "$MODEL", binary: "$LLAMA_SERVER", args: $ARGS}
  writer:
    llama_server: {model: "$MODEL", binary: "$LLAMA_SERVER", args: $ARGS}
EOF

# -- 4. start both programs --------------------------------------------------------------------
AGENT_PID=""
GATEWAY_PID=""
stop_pid() {  # stop_pid PID NAME: SIGTERM, wait up to 20 s, then SIGKILL
    local pid="$1" i
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 200; i++)); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    echo "    $2 did not stop in 20 s; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    trap - EXIT INT TERM
    if [[ -n "$AGENT_PID$GATEWAY_PID" ]]; then
        step "stopping the node agent (it stops its llama-servers) and the gateway"
        stop_pid "$AGENT_PID" "node agent"   # first, so it can deregister from the gateway
        stop_pid "$GATEWAY_PID" gateway
        echo "    stopped; logs are in $STATE/"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step "starting the node agent on 127.0.0.1:$AGENT_PORT (log: $STATE/agent.log)"
.venv/bin/rolemesh-node-agent --config "$STATE/node-agent.yaml" > "$STATE/agent.log" 2>&1 &
AGENT_PID=$!
step "starting the gateway on 127.0.0.1:$GATEWAY_PORT (log: $STATE/gateway.log)"
echo "    ROLE_MESH_CONFIG=$STATE/models.yaml uvicorn rolemesh_gateway.main:app --host 127.0.0.1 --port $GATEWAY_PORT"
ROLE_MESH_CONFIG="$STATE/models.yaml" .venv/bin/uvicorn rolemesh_gateway.main:app \
    --host 127.0.0.1 --port "$GATEWAY_PORT" > "$STATE/gateway.log" 2>&1 &
GATEWAY_PID=$!

check_alive() {
    if ! kill -0 "$AGENT_PID" 2>/dev/null; then
        tail -n 20 "$STATE/agent.log" >&2; die "the node agent exited (log above: $STATE/agent.log)"
    fi
    if ! kill -0 "$GATEWAY_PID" 2>/dev/null; then
        tail -n 20 "$STATE/gateway.log" >&2; die "the gateway exited (log above: $STATE/gateway.log)"
    fi
}

# Ready means every alias can serve: /ready speaks for the default model only, and the agent
# registers each role as soon as its llama-server has loaded, one after the other.
all_models_ready() {
    [[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$GATEWAY_PORT/ready")" == 200 ]] \
        && curl -s "http://127.0.0.1:$GATEWAY_PORT/v1/models" -H "X-Api-Key: $CLIENT_KEY" \
            | .venv/bin/python -c 'import json,sys; sys.exit(1 if json.load(sys.stdin)["rolemesh"]["unavailable_models"] else 0)' \
            2>/dev/null
}

step "waiting for the gateway to be ready (llama-server loads the models, the agent registers them)"
waited=0
shown=""
until all_models_ready; do
    check_alive
    ((waited >= READY_TIMEOUT * 4)) && die "not ready after ${READY_TIMEOUT}s; see $STATE/agent.log and $STATE/gateway.log"
    if ((waited % 8 == 0)); then   # every 2 s: what the agent's roles are doing
        roles="$(curl -s "http://127.0.0.1:$AGENT_PORT/health" 2>/dev/null \
            | .venv/bin/python -c 'import json,sys; r=json.load(sys.stdin)["roles"]; print(", ".join(f"{k}: {v}" for k,v in r.items()))' \
            2>/dev/null || echo "agent starting")"
        [[ "$roles" != "$shown" ]] && echo "    $((waited / 4))s: $roles"
        shown="$roles"
    fi
    sleep 0.25
    waited=$((waited + 1))
done
echo "    ready after $((SECONDS - STARTED))s in total"

# -- 5. the guide's smoke test, verbatim --------------------------------------------------------
step "smoke test 1: GET /v1/models"
echo "curl -sS http://127.0.0.1:8000/v1/models \\
  -H 'X-Api-Key: change-me-client-key'"
MODELS="$(curl -sS http://127.0.0.1:8000/v1/models \
  -H 'X-Api-Key: change-me-client-key')"
echo "$MODELS"

step "smoke test 2: POST /v1/chat/completions"
echo "curl -sS -X POST http://127.0.0.1:8000/v1/chat/completions \\
  -H 'Content-Type: application/json' \\
  -H 'X-Api-Key: change-me-client-key' \\
  -d '{
\"model\": \"planner\",
\"messages\": [{\"role\":\"user\",\"content\":\"Say hello in 3 words.\"}]
}'"
CHAT="$(curl -sS -X POST http://127.0.0.1:8000/v1/chat/completions \
  -H 'Content-Type: application/json' \
  -H 'X-Api-Key: change-me-client-key' \
  -d '{
"model": "planner",
"messages": [{"role":"user","content":"Say hello in 3 words."}]
}')"
echo "$CHAT"

SUMMARY="$(MODELS="$MODELS" CHAT="$CHAT" .venv/bin/python - <<'EOF'
import json, os, sys
try:
    models = [m["id"] for m in json.loads(os.environ["MODELS"])["data"]]
    chat = json.loads(os.environ["CHAT"])
    text = chat["choices"][0]["message"]["content"]
    tokens = chat.get("usage", {}).get("completion_tokens")
except (KeyError, IndexError, TypeError, ValueError) as exc:
    sys.exit(f"unexpected answer ({exc!r})")
if sorted(models) != ["planner", "writer"] or not text:
    sys.exit(f"expected models planner and writer and a non-empty answer; got {models}, {text!r}")
print(f"models: {', '.join(models)}")
print(f"planner answered with {tokens} generated tokens: {text[:200]!r}")
EOF
)" || die "the smoke test failed: $SUMMARY"

step "it works ($((SECONDS - STARTED))s)"
cat <<EOF
$SUMMARY

Point any OpenAI client at the gateway:
    base_url = "http://127.0.0.1:$GATEWAY_PORT/v1"
    api_key  = "$CLIENT_KEY"

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:$GATEWAY_PORT/v1", api_key="$CLIENT_KEY")
    print(client.chat.completions.create(model="writer",
          messages=[{"role": "user", "content": "Hi"}]).choices[0].message.content)

Nodes as the gateway sees them:
    curl -sS http://127.0.0.1:$GATEWAY_PORT/v1/nodes -H 'X-Api-Key: $CLIENT_KEY'
Configs and logs: $STATE/ (models.yaml, node-agent.yaml, gateway.log, agent.log)
EOF

if ((SMOKE)); then
    exit 0
fi
step "running; press Ctrl-C to stop both programs"
while kill -0 "$AGENT_PID" 2>/dev/null && kill -0 "$GATEWAY_PID" 2>/dev/null; do
    sleep 1
done
check_alive
