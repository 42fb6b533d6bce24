#!/usr/bin/env bash
# Container test: build the Dockerfile's images on this machine with podman, without any image
# registry, and run them against a fake upstream. Exits non-zero on the first failure.
#
#   bash scripts/container_test.sh
#
# What it does:
#   1. installs podman, runc, debootstrap, curl and systemd (journalctl) with apt-get when missing;
#   2. makes a minimal Debian base image (python3, python3-venv, python3-pip, ca-certificates)
#      with debootstrap from the Debian mirror this machine's apt uses, cached as a tarball in
#      $CACHE/container-base/ and as a local podman image (`podman image exists`), so only the
#      first run on a machine pays for it (about a minute);
#   3. builds the `gateway` and `agent` targets with --build-arg BASE_IMAGE=<that image>, with
#      this machine's CA bundle and pip index settings passed into the build;
#   4. runs the gateway container (--network host, read-only root, no capabilities, keys from an
#      env file, config mounted read-only) on a free 127.0.0.1 port in front of a fake upstream,
#      checks /health, a chat completion with the client key, a 401 without it, that it runs as
#      a non-root user and that the image's HEALTHCHECK passes; then the guide's uvicorn form;
#      then deploy/compose.yaml as shipped, with podman-compose (skipped if 127.0.0.1:8080 is
#      taken);
#   5. runs `rolemesh-node-agent --help` / `--version` in the agent image, then the agent as a
#      container that registers with the gateway container and serves a role through it; when a
#      llama-server binary and the tiny test model are already on this machine (scripts/
#      llama_server.sh and the end-to-end tests leave them in $CACHE), also the documented
#      mounted-llama-server setup: a real chat completion gateway -> agent -> llama-server;
#   6. the systemd units of deploy/, unchanged, under a real systemd (podman --systemd=always, a
#      network namespace of its own): both start as the rolemesh user and serve (with the mounted
#      llama-server too when there is one), the gateway is restarted after kill -9 and stops
#      cleanly on systemctl stop, and at a system shutdown the agent stops first (deregisters)
#      and both exit cleanly.
#   Containers, the fake upstream and temp files are removed on exit; the images stay (tags
#   localhost/rolemesh-gateway:test, localhost/rolemesh-node-agent:test) so a second run reuses
#   their layers.
#
# $CACHE is ${ROLE_MESH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rolemesh} (as for
# scripts/llama_server.sh). Knobs: ROLE_MESH_LLAMA_SERVER (a llama-server to mount),
# ROLE_MESH_TEST_MODEL (a GGUF for it), ROLE_MESH_CONTAINER_LLAMA=0 (skip the llama-server part).
# Needs root (rootful podman, debootstrap). podman is run with its own containers.conf
# (runtime runc, no default ulimits) through CONTAINERS_CONF.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${ROLE_MESH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rolemesh}"
GW_IMAGE=localhost/rolemesh-gateway:test
AGENT_IMAGE=localhost/rolemesh-node-agent:test
BASE_PACKAGES=python3,python3-venv,python3-pip,ca-certificates
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
CLIENT_KEY="ct-client-$RANDOM$RANDOM"
NODE_KEY="ct-node-$RANDOM$RANDOM"
T0=$SECONDS

log() { printf '[container_test %4ds] %s\n' "$((SECONDS - T0))" "$*" >&2; }
die() { printf '[container_test] FAILED: %s\n' "$*" >&2; exit 1; }

WORK=""
PODMAN_LOG=""
COMPOSE_PROJECT=""
FAKE_PID=""
CONTAINERS=()
cleanup() {
    local rc=$?
    set +e
    local c
    for c in "${CONTAINERS[@]+"${CONTAINERS[@]}"}"; do
        if [[ $rc -ne 0 ]] && podman container exists "$c" 2>/dev/null; then
            echo "---- last log lines of container $c ----" >&2
            podman logs --tail 25 "$c" >&2 2>&1
        fi
        podman rm -f -t 2 "$c" >/dev/null 2>&1
    done
    if [[ -n "$COMPOSE_PROJECT" ]]; then  # the pod podman-compose may have made
        podman pod ls -q --filter "name=$COMPOSE_PROJECT" 2>/dev/null | xargs -r podman pod rm -f >/dev/null 2>&1
    fi
    if [[ $rc -ne 0 && -s "${PODMAN_LOG:-}" ]]; then
        echo "---- last lines of podman's own messages ----" >&2
        tail -n 15 "$PODMAN_LOG" >&2
    fi
    if [[ -n "$FAKE_PID" ]]; then
        kill "$FAKE_PID" 2>/dev/null
        wait "$FAKE_PID" 2>/dev/null
    fi
    [[ -n "$WORK" ]] && rm -rf -- "$WORK"
    if [[ $rc -eq 0 ]]; then
        log "all container checks passed"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'printf "[container_test] FAILED: line %s: %s\n" "$LINENO" "$BASH_COMMAND" >&2' ERR
trap 'exit 130' INT
trap 'exit 143' TERM

[[ $(id -u) -eq 0 ]] || die "run as root (rootful podman and debootstrap)"

# ---------------------------------------------------------------------------------------------
# 1. tools
need=()
for pair in podman:podman runc:runc debootstrap:debootstrap curl:curl journalctl:systemd; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
if [[ ${#need[@]} -gt 0 ]]; then
    log "apt-get install ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
command -v python3 >/dev/null 2>&1 || die "python3 not found (needed for the fake upstream)"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/rolemesh-container-test.XXXXXX")"
chmod 0755 "$WORK"   # the containers' user (uid 10001) reads the mounted configs
mkdir -p "$WORK/conf"
chmod 0755 "$WORK/conf"
cat >"$WORK/containers.conf" <<'EOF'
[containers]
default_ulimits = []

[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF="$WORK/containers.conf"

# ---------------------------------------------------------------------------------------------
# 2. the Debian base image
# shellcheck disable=SC1091
. /etc/os-release
SUITE="${VERSION_CODENAME:-}"
[[ -n "$SUITE" ]] || die "cannot tell this machine's Debian suite from /etc/os-release"
ARCH="$(dpkg --print-architecture)"
MIRROR="$(python3 - "$SUITE" <<'PY'
import glob, re, sys
suite = sys.argv[1]
found = []
for path in sorted(glob.glob("/etc/apt/sources.list") + glob.glob("/etc/apt/sources.list.d/*.list")
                   + glob.glob("/etc/apt/sources.list.d/*.sources")):
    try:
        text = open(path).read()
    except OSError:
        continue
    if path.endswith(".sources"):  # deb822 stanzas
        for stanza in re.split(r"\n\s*\n", text):
            fields = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                k, v = line.split(":", 1)
                fields[k.strip().lower()] = v.split()
            if fields.get("enabled", ["yes"])[0].lower() == "no":
                continue
            if "deb" in fields.get("types", []) and suite in fields.get("suites", []):
                found += fields.get("uris", [])
    else:
        for line in text.splitlines():
            parts = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] == suite:
                found.append(parts[1])
if not found:
    sys.exit(f"no 'deb' source for suite {suite} in /etc/apt/sources.list*")
print(found[0])
PY
)" || die "could not find the Debian mirror this machine uses"

base_key="$(printf '%s\n' "$SUITE" "$ARCH" "$MIRROR" "$BASE_PACKAGES" minbase | sha256sum | cut -c1-12)"
BASE_IMAGE="localhost/rolemesh-test-base:${SUITE}-${base_key}"
BASE_DIR="$CACHE/container-base"
BASE_TAR="$BASE_DIR/debian-${SUITE}-${ARCH}-${base_key}.tar.gz"
mkdir -p "$BASE_DIR"

exec {lockfd}>"$BASE_DIR/.lock"
if ! flock -n "$lockfd"; then
    log "another container test holds $BASE_DIR/.lock; waiting..."
    flock "$lockfd"
fi
if podman image exists "$BASE_IMAGE"; then
    log "base image $BASE_IMAGE is cached"
else
    if [[ ! -s "$BASE_TAR" ]]; then
        log "debootstrap $SUITE ($ARCH, minbase + $BASE_PACKAGES) from $MIRROR; 1-3 minutes..."
        rootfs="$(mktemp -d "$BASE_DIR/.rootfs.XXXXXX")"
        started=$SECONDS
        if ! debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$rootfs" "$MIRROR" \
                >"$WORK/debootstrap.log" 2>&1; then
            tail -n 30 "$WORK/debootstrap.log" >&2
            for m in proc sys dev/pts dev; do umount "$rootfs/$m" 2>/dev/null || true; done
            rm -rf -- "$rootfs"
            die "debootstrap failed"
        fi
        log "debootstrap done in $((SECONDS - started))s; packing $BASE_TAR"
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar --numeric-owner --exclude=./proc/* --exclude=./sys/* --exclude=./dev/* \
            -C "$rootfs" -czf "$BASE_TAR.tmp" .
        mv -f "$BASE_TAR.tmp" "$BASE_TAR"
        rm -rf -- "$rootfs"
    else
        log "base tarball $BASE_TAR is cached"
    fi
    log "podman import $BASE_TAR as $BASE_IMAGE"
    podman import --quiet --change 'CMD ["/bin/bash"]' "$BASE_TAR" "$BASE_IMAGE" >/dev/null
fi
flock -u "$lockfd"

# ---------------------------------------------------------------------------------------------
# 3. build the images
BUILD_ARGS=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
BUILD_MOUNTS=()
# pip inside the build gets this machine's CA bundle and index settings (env first, then pip's
# config files); file:// indexes and find-links are local to the host and left out.
PIP_SETTINGS="$(python3 - <<'PY'
import os, subprocess
conf = {}
try:
    out = subprocess.run(["python3", "-m", "pip", "config", "list"], capture_output=True, text=True,
                         timeout=60).stdout
except (OSError, subprocess.SubprocessError):
    out = ""
for line in out.splitlines():
    key, _, value = line.partition("=")
    section, _, name = key.partition(".")
    if section in ("global", "install", "wheel", "download") and name not in conf:
        conf[name] = value.strip().strip("'\"")
def get(name):
    return os.environ.get("PIP_" + name.upper().replace("-", "_")) or conf.get(name, "")
index = get("index-url")
extra = " ".join(u for u in get("extra-index-url").split() if not u.startswith("file:"))
cert = get("cert")
print(f"index={index if not index.startswith('file:') else ''}")
print(f"extra={extra}")
print(f"cert={cert}")
PY
)"
pip_index="$(sed -n 's/^index=//p' <<<"$PIP_SETTINGS")"
pip_extra="$(sed -n 's/^extra=//p' <<<"$PIP_SETTINGS")"
pip_cert="$(sed -n 's/^cert=//p' <<<"$PIP_SETTINGS")"
[[ -n "$pip_index" ]] && BUILD_ARGS+=(--build-arg "PIP_INDEX_URL=$pip_index")
[[ -n "$pip_extra" ]] && BUILD_ARGS+=(--build-arg "PIP_EXTRA_INDEX_URL=$pip_extra")
if [[ -f "$CA_BUNDLE" ]]; then
    BUILD_MOUNTS+=(-v "$CA_BUNDLE:$CA_BUNDLE:ro")
    [[ -n "$pip_cert" ]] || pip_cert="$CA_BUNDLE"
fi
if [[ -n "$pip_cert" ]]; then
    [[ -f "$pip_cert" ]] || die "pip's cert $pip_cert does not exist"
    [[ "$pip_cert" == "$CA_BUNDLE" ]] || BUILD_MOUNTS+=(-v "$pip_cert:$pip_cert:ro")
    BUILD_ARGS+=(--build-arg "PIP_CERT=$pip_cert")
fi
log "pip in the build: index ${pip_index:-PyPI (the default)}${pip_extra:+, extra $pip_extra}, cert ${pip_cert:-the bundled one}"

build() {  # build TARGET TAG
    local target="$1" tag="$2" started=$SECONDS old_id new_id
    old_id="$(podman image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)"
    log "podman build --target $target -t $tag (progress: build steps)"
    if ! podman build --format docker --network host --layers --pull=never \
            "${BUILD_MOUNTS[@]}" "${BUILD_ARGS[@]}" --target "$target" -t "$tag" \
            -f "$ROOT/Dockerfile" "$ROOT" 2>&1 \
            | tee "$WORK/build-$target.log" \
            | grep --line-buffered -E '^\[[0-9]+/[0-9]+\] STEP [0-9]+/[0-9]+: (FROM|RUN|COPY)' \
            | cut -c1-110 >&2; then
        tail -n 40 "$WORK/build-$target.log" >&2
        die "podman build --target $target failed"
    fi
    log "built $tag in $((SECONDS - started))s ($(podman image inspect --format '{{.Size}}' "$tag" \
        | awk '{printf "%.0f MB", $1 / 1e6}'))"
    new_id="$(podman image inspect --format '{{.Id}}' "$tag")"
    if [[ -n "$old_id" && "$old_id" != "$new_id" ]]; then  # the previous run's image, now untagged
        podman rmi "$old_id" >/dev/null 2>&1 || true
    fi
}
build gateway "$GW_IMAGE"
build agent "$AGENT_IMAGE"

# ---------------------------------------------------------------------------------------------
# 4. the gateway container in front of a fake upstream
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

cat >"$WORK/fake_upstream.py" <<'PY'
"""A fake OpenAI-compatible upstream: GET /health 200, POST /v1/chat/completions a fixed answer."""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/health":
            self._json(200, {"status": "ok"})
        else:
            self._json(404, {"error": {"message": "not found"}})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        req = json.loads(self.rfile.read(length) or b"{}")
        if self.path != "/v1/chat/completions":
            self._json(404, {"error": {"message": "not found"}})
            return
        self._json(200, {
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 0,
            "model": req.get("model"),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "hello from the fake upstream"}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
        })

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
PY

FAKE_PORT="$(free_port)"
python3 "$WORK/fake_upstream.py" "$FAKE_PORT" >"$WORK/fake.log" 2>&1 &
FAKE_PID=$!

# wait_http URL SECONDS [CONTAINER]: until URL answers 200 (fails early if CONTAINER stopped)
wait_http() {
    local url="$1" deadline=$((SECONDS + $2)) ctr="${3:-}"
    while ((SECONDS < deadline)); do
        if [[ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url" 2>/dev/null)" == 200 ]]; then
            return 0
        fi
        if [[ -n "$ctr" && "$(podman inspect --format '{{.State.Running}}' "$ctr" 2>/dev/null)" != true ]]; then
            die "container $ctr stopped before $url answered"
        fi
        sleep 0.3
    done
    die "no 200 from $url within $2 s"
}
wait_http "http://127.0.0.1:$FAKE_PORT/health" 10

GW_PORT="$(free_port)"
cat >"$WORK/conf/models.yaml" <<EOF
version: 1
default_model: planner
auth:
  client_api_keys: ["\${ROLE_MESH_CLIENT_KEY}"]
  node_api_keys: ["\${ROLE_MESH_NODE_KEY}"]
models:
  planner: {type: proxy, proxy_url: "http://127.0.0.1:$FAKE_PORT"}
  writer: {type: discovered, role: writer}
  tiny: {type: discovered, role: tiny}
probes: {interval_s: 1}
EOF
printf 'ROLE_MESH_CLIENT_KEY=%s\nROLE_MESH_NODE_KEY=%s\n' "$CLIENT_KEY" "$NODE_KEY" >"$WORK/conf/rolemesh.env"
chmod 0644 "$WORK/conf/models.yaml"
chmod 0600 "$WORK/conf/rolemesh.env"   # read by podman (root), not mounted

# The same hardening as deploy/compose.yaml: read-only root, a tmpfs /tmp, no capabilities.
HARDENING=(--read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges)

# podman's own complaints (without systemd it cannot set up healthcheck timers; the checks are
# run by hand with `podman healthcheck run`) go to a log, shown when something fails.
PODMAN_LOG="$WORK/podman.log"
: >"$PODMAN_LOG"

# run_ctr NAME ARGS...: podman run -d, remembered for cleanup
run_ctr() {
    local name="$1"
    shift
    CONTAINERS+=("$name")
    podman run -d --pull never --name "$name" "$@" >/dev/null 2>>"$PODMAN_LOG" \
        || { tail -n 20 "$PODMAN_LOG" >&2; die "podman run of $name failed"; }
}

# chat PORT MODEL EXPECT: a non-streamed chat completion with the client key
chat() {
    local port="$1" model="$2" expect="$3" out
    out="$(curl -sS --max-time 60 -X POST "http://127.0.0.1:$port/v1/chat/completions" \
        -H 'Content-Type: application/json' -H "Authorization: Bearer $CLIENT_KEY" \
        -d "{\"model\": \"$model\", \"max_tokens\": 8, \"messages\": [{\"role\": \"user\", \"content\": \"Say hi\"}]}")" \
        || die "chat completion for $model on port $port: curl failed"
    python3 - "$out" "$expect" <<'PY' || die "chat completion for $model: unexpected answer: $out"
import json, sys
body, expect = json.loads(sys.argv[1]), sys.argv[2]
content = body["choices"][0]["message"]["content"]
assert body["object"] == "chat.completion", body
assert isinstance(content, str) and (expect in content if expect else True), content
PY
    echo "$out"
}

check_non_root() {  # check_non_root CONTAINER
    local uid
    uid="$(podman exec "$1" id -u)" || die "podman exec $1 id -u failed"
    [[ "$uid" =~ ^[0-9]+$ && "$uid" -ne 0 ]] || die "container $1 runs as uid '$uid'"
    local top
    top="$(podman top "$1" huser comm | tail -n +2 | tr -s ' ')"
    if awk '$1 == "root" || $1 == "0" {bad = 1} END {exit !bad}' <<<"$top"; then
        die "a process of $1 runs as root on the host: $top"
    fi
    log "  $1 runs as uid $uid (host view: $(head -n1 <<<"$top"))"
}

GW="rolemesh-ct-gateway-$$"
log "gateway container on 127.0.0.1:$GW_PORT (fake upstream on :$FAKE_PORT)"
run_ctr "$GW" --network host "${HARDENING[@]}" --env-file "$WORK/conf/rolemesh.env" \
    -e "ROLE_MESH_HEALTH_URL=http://127.0.0.1:$GW_PORT/health" --health-interval disable \
    -v "$WORK/conf/models.yaml:/etc/rolemesh/models.yaml:ro" \
    "$GW_IMAGE" rolemesh-gateway --config /etc/rolemesh/models.yaml --host 127.0.0.1 --port "$GW_PORT"
wait_http "http://127.0.0.1:$GW_PORT/health" 40 "$GW"
log "  GET /health: 200"
status="$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -X POST \
    "http://127.0.0.1:$GW_PORT/v1/chat/completions" -H 'Content-Type: application/json' \
    -d '{"model": "planner", "messages": [{"role": "user", "content": "hi"}]}')"
[[ "$status" == 401 ]] || die "a chat completion without a key got $status, not 401"
log "  chat completion without a key: 401"
answer="$(chat "$GW_PORT" planner "hello from the fake upstream")"
log "  chat completion with the key: $(cut -c1-100 <<<"$answer")..."
check_non_root "$GW"
podman healthcheck run "$GW" >/dev/null 2>>"$PODMAN_LOG" || die "the gateway image's HEALTHCHECK failed"
log "  HEALTHCHECK: healthy"

UV="rolemesh-ct-uvicorn-$$"
UV_PORT="$(free_port)"
log "the guide's uvicorn form in the gateway image on 127.0.0.1:$UV_PORT"
run_ctr "$UV" --network host "${HARDENING[@]}" --env-file "$WORK/conf/rolemesh.env" \
    -e "ROLE_MESH_HEALTH_URL=http://127.0.0.1:$UV_PORT/health" --health-interval disable \
    -v "$WORK/conf/models.yaml:/etc/rolemesh/models.yaml:ro" \
    "$GW_IMAGE" uvicorn rolemesh_gateway.main:app --host 127.0.0.1 --port "$UV_PORT" --no-access-log
wait_http "http://127.0.0.1:$UV_PORT/health" 40 "$UV"
chat "$UV_PORT" planner "hello from the fake upstream" >/dev/null
check_non_root "$UV"
podman rm -f -t 5 "$UV" >/dev/null 2>>"$PODMAN_LOG"
log "  uvicorn form: /health 200, chat completion OK"

# deploy/compose.yaml itself, with podman-compose (from PyPI, in a venv cached in $CACHE): the
# shipped file and models.yaml, keys from its env_file, the image just built instead of a build
# (an override file), a project name of its own. It binds 127.0.0.1:8080 as shipped, so it is
# skipped when that port is taken.
if python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 8080))' 2>/dev/null; then
    PC_VENV="$CACHE/podman-compose-venv"
    if [[ ! -x "$PC_VENV/bin/podman-compose" ]]; then
        log "installing podman-compose into $PC_VENV"
        rm -rf "$PC_VENV"
        python3 -m venv "$PC_VENV"
        "$PC_VENV/bin/pip" install -q --disable-pip-version-check "podman-compose==1.6.0" \
            >"$WORK/pip-compose.log" 2>&1 || { tail -n 20 "$WORK/pip-compose.log" >&2; die "pip install podman-compose failed"; }
    fi
    COMPOSE_PROJECT="rolemesh-ct-$$"
    COMPOSE_DIR="$WORK/compose/deploy"
    mkdir -p "$COMPOSE_DIR"
    cp "$ROOT/deploy/compose.yaml" "$ROOT/deploy/models.yaml" "$COMPOSE_DIR/"
    chmod 0755 "$WORK/compose" "$COMPOSE_DIR"
    chmod 0644 "$COMPOSE_DIR/models.yaml"
    cp "$WORK/conf/rolemesh.env" "$COMPOSE_DIR/rolemesh.env"
    printf 'services:\n  gateway:\n    image: %s\n' "$GW_IMAGE" >"$COMPOSE_DIR/test-image.yaml"
    compose() {
        (cd "$COMPOSE_DIR" && "$PC_VENV/bin/podman-compose" -p "$COMPOSE_PROJECT" \
            -f compose.yaml -f test-image.yaml "$@")
    }
    log "podman-compose up deploy/compose.yaml (project $COMPOSE_PROJECT, 127.0.0.1:8080)"
    compose up -d --no-build >"$WORK/compose-up.log" 2>&1 \
        || { tail -n 20 "$WORK/compose-up.log" >&2; die "podman-compose up failed"; }
    mapfile -t pc_ctrs < <(podman ps -a --filter "label=io.podman.compose.project=$COMPOSE_PROJECT" \
        --format '{{.Names}}')
    [[ ${#pc_ctrs[@]} -eq 1 ]] || die "expected one compose container, found: ${pc_ctrs[*]}"
    CONTAINERS+=("${pc_ctrs[0]}")
    wait_http "http://127.0.0.1:8080/health" 40 "${pc_ctrs[0]}"
    status="$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 http://127.0.0.1:8080/v1/models)"
    [[ "$status" == 401 ]] || die "compose gateway: /v1/models without a key got $status, not 401"
    curl -sf --max-time 5 -H "Authorization: Bearer $CLIENT_KEY" http://127.0.0.1:8080/v1/models >/dev/null \
        || die "compose gateway: /v1/models with the key from the env_file failed"
    check_non_root "${pc_ctrs[0]}"
    [[ "$(podman inspect --format '{{.HostConfig.NetworkMode}} {{.HostConfig.ReadonlyRootfs}}' "${pc_ctrs[0]}")" \
        == "host true" ]] || die "compose gateway: not on the host network with a read-only root"
    compose down >"$WORK/compose-down.log" 2>&1 \
        || { tail -n 20 "$WORK/compose-down.log" >&2; die "podman-compose down failed"; }
    log "  compose: /health 200, 401 without a key, the env_file's key works, host network, read-only, uid 10001; down"
else
    log "127.0.0.1:8080 is taken: the deploy/compose.yaml run is skipped"
fi

# ---------------------------------------------------------------------------------------------
# 5. the agent image
log "agent image: rolemesh-node-agent --help / --version"
podman run --rm --pull never --no-healthcheck "$AGENT_IMAGE" rolemesh-node-agent --help >"$WORK/agent-help.txt" 2>>"$PODMAN_LOG" \
    || { tail -n 20 "$PODMAN_LOG" >&2; die "rolemesh-node-agent --help failed in the agent image"; }
grep -qi usage "$WORK/agent-help.txt" || die "rolemesh-node-agent --help printed no usage"
version="$(podman run --rm --pull never --no-healthcheck "$AGENT_IMAGE" rolemesh-node-agent --version 2>>"$PODMAN_LOG")" \
    || die "rolemesh-node-agent --version failed in the agent image"
[[ "$version" =~ [0-9]+\.[0-9]+ ]] || die "rolemesh-node-agent --version printed '$version'"
log "  $version"

# A llama-server to mount, and the tiny model, if this machine has them already (never built here).
LLAMA_BIN="${ROLE_MESH_LLAMA_SERVER:-}"
if [[ -z "$LLAMA_BIN" ]]; then
    for cand in "$CACHE"/llama-server-*/bin/llama-server; do
        [[ -x "$cand" ]] && LLAMA_BIN="$cand"
    done
fi
if [[ -z "$LLAMA_BIN" ]]; then
    LLAMA_BIN="$(command -v llama-server 2>/dev/null || true)"
fi
MODEL="${ROLE_MESH_TEST_MODEL:-$CACHE/models/tiny-llama.gguf}"
USE_LLAMA=0
if [[ "${ROLE_MESH_CONTAINER_LLAMA:-1}" == 0 ]]; then
    log "  ROLE_MESH_CONTAINER_LLAMA=0: the mounted llama-server part is skipped"
elif [[ -z "$LLAMA_BIN" || ! -x "$LLAMA_BIN" ]]; then
    log "  no llama-server on this machine (bash scripts/llama_server.sh builds one): the mounted llama-server part is skipped"
elif [[ ! -f "$MODEL" ]]; then
    log "  no test model at $MODEL (python scripts/make_tiny_model.py --out $MODEL): the mounted llama-server part is skipped"
else
    USE_LLAMA=1
    LLAMA_BIN="$(readlink -f "$LLAMA_BIN")"
    MODEL="$(readlink -f "$MODEL")"
    out="$(podman run --rm --pull never --no-healthcheck -v "$LLAMA_BIN:/opt/llama/bin/llama-server:ro" \
        "$AGENT_IMAGE" sh -c '"$ROLE_MESH_LLAMA_SERVER" --version 2>&1')" \
        || die "the mounted llama-server does not run in the agent image: $out"
    log "  mounted $LLAMA_BIN runs in the image: $(grep -m1 version <<<"$out")"
fi

AG="rolemesh-ct-agent-$$"
AG_PORT="$(free_port)"
{
    cat <<EOF
version: 1
node_id: container-test-$$
gateway_url: http://127.0.0.1:$GW_PORT
node_key: \${ROLE_MESH_NODE_KEY}
host: 127.0.0.1
port: $AG_PORT
heartbeat_interval_s: 2
roles:
  writer:
    url: http://127.0.0.1:$FAKE_PORT
EOF
    if [[ $USE_LLAMA == 1 ]]; then
        cat <<EOF
  tiny:
    llama_server:
      model: /models/tiny.gguf
      args: ["-c", "512", "-n", "16", "-t", "1", "--chat-template", "chatml"]
EOF
    fi
} >"$WORK/conf/node-agent.yaml"
chmod 0644 "$WORK/conf/node-agent.yaml"
AG_MOUNTS=(-v "$WORK/conf/node-agent.yaml:/etc/rolemesh/node-agent.yaml:ro")
if [[ $USE_LLAMA == 1 ]]; then
    AG_MOUNTS+=(-v "$LLAMA_BIN:/opt/llama/bin/llama-server:ro" -v "$MODEL:/models/tiny.gguf:ro")
fi
log "agent container on 127.0.0.1:$AG_PORT, registering with the gateway container"
run_ctr "$AG" --network host "${HARDENING[@]}" --env-file "$WORK/conf/rolemesh.env" \
    -e "ROLE_MESH_HEALTH_URL=http://127.0.0.1:$AG_PORT/health" --health-interval disable \
    "${AG_MOUNTS[@]}" "$AGENT_IMAGE"   # the image's own command: --config /etc/rolemesh/node-agent.yaml
wait_http "http://127.0.0.1:$AG_PORT/health" 40 "$AG"
check_non_root "$AG"
podman healthcheck run "$AG" >/dev/null 2>>"$PODMAN_LOG" || die "the agent image's HEALTHCHECK failed"
log "  agent /health 200, HEALTHCHECK healthy"

# wait_model ALIAS SECONDS: until the gateway lists ALIAS as available (the agent registered it)
wait_model() {
    local deadline=$((SECONDS + $2))
    while ((SECONDS < deadline)); do
        if curl -s --max-time 2 -H "Authorization: Bearer $CLIENT_KEY" "http://127.0.0.1:$GW_PORT/v1/models" \
            | python3 -c 'import json, sys; ids = [m["id"] for m in json.load(sys.stdin)["data"]]; sys.exit(sys.argv[1] not in ids)' "$1" \
            2>/dev/null; then
            return 0
        fi
        [[ "$(podman inspect --format '{{.State.Running}}' "$AG" 2>/dev/null)" == true ]] \
            || die "the agent container stopped"
        sleep 0.5
    done
    die "the gateway did not list '$1' within $2 s"
}
wait_model writer 30
chat "$GW_PORT" writer "hello from the fake upstream" >/dev/null
log "  gateway -> agent (role writer) -> fake upstream: chat completion OK"
if [[ $USE_LLAMA == 1 ]]; then
    wait_model tiny 120
    answer="$(chat "$GW_PORT" tiny "")"
    log "  gateway -> agent -> mounted llama-server (tiny model): $(cut -c1-100 <<<"$answer")..."
fi

# ---------------------------------------------------------------------------------------------
# 6. the systemd units, unchanged, under a real systemd: a container of the base image with
#    systemd, the venv at /opt/rolemesh/venv and the rolemesh user as docs/deploy.md sets them
#    up, in a network namespace of its own (so the units' fixed ports 8080/8091 clash with nothing)
SD_IMAGE=localhost/rolemesh-systemd:test
mkdir -p "$WORK/sd" "$WORK/sdconf"
cp "$ROOT/deploy/rolemesh-gateway.service" "$ROOT/deploy/rolemesh-node-agent.service" "$WORK/sd/"
{
    echo "FROM $BASE_IMAGE"
    echo 'RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends systemd systemd-sysv libgomp1 && rm -rf /var/lib/apt/lists/*'
    echo 'RUN useradd --system --home-dir /var/lib/rolemesh --shell /usr/sbin/nologin rolemesh'
    echo "COPY --from=$AGENT_IMAGE /opt/rolemesh/venv /opt/rolemesh/venv"
    echo 'COPY rolemesh-gateway.service rolemesh-node-agent.service /etc/systemd/system/'
    echo 'STOPSIGNAL SIGRTMIN+3'
    echo 'CMD ["/sbin/init"]'
} >"$WORK/sd/Containerfile"
log "systemd units: podman build $SD_IMAGE (base + systemd + the venv + deploy/*.service)"
podman build --format docker --network host --layers --pull=never -t "$SD_IMAGE" "$WORK/sd" \
    >"$WORK/build-systemd.log" 2>&1 || { tail -n 30 "$WORK/build-systemd.log" >&2; die "building $SD_IMAGE failed"; }

SD_FAKE_PORT=18000
printf '%s\n' \
    'version: 1' \
    'default_model: planner' \
    'auth:' \
    '  client_api_keys: ["${ROLE_MESH_CLIENT_KEY}"]' \
    '  node_api_keys: ["${ROLE_MESH_NODE_KEY}"]' \
    'models:' \
    "  planner: {type: proxy, proxy_url: \"http://127.0.0.1:$SD_FAKE_PORT\"}" \
    '  writer: {type: discovered, role: writer}' \
    '  tiny: {type: discovered, role: tiny}' \
    'probes: {interval_s: 1}' >"$WORK/sdconf/models.yaml"
printf '%s\n' \
    'version: 1' \
    'node_id: systemd-test' \
    'gateway_url: http://127.0.0.1:8080' \
    'node_key: ${ROLE_MESH_NODE_KEY}' \
    'host: 127.0.0.1' \
    'port: 8091' \
    'heartbeat_interval_s: 2' \
    'roles:' \
    '  writer:' \
    "    url: http://127.0.0.1:$SD_FAKE_PORT" >"$WORK/sdconf/node-agent.yaml"
if [[ $USE_LLAMA == 1 ]]; then
    printf '%s\n' \
        '  tiny:' \
        '    llama_server:' \
        '      model: /srv/models/tiny.gguf' \
        '      args: ["-c", "512", "-n", "16", "-t", "1", "--chat-template", "chatml"]' \
        >>"$WORK/sdconf/node-agent.yaml"
fi
cp "$WORK/conf/rolemesh.env" "$WORK/sdconf/rolemesh.env"
# /etc/rolemesh as docs/deploy.md installs it: 0750 root:rolemesh, configs 0640 root:rolemesh,
# the env file 0600 root (read by systemd only). Rootful podman keeps ids, so the host-side
# group is the image's rolemesh gid.
sd_gid="$(podman run --rm --pull never --no-healthcheck "$SD_IMAGE" id -g rolemesh 2>>"$PODMAN_LOG")" \
    || die "no rolemesh group in $SD_IMAGE"
chown "0:$sd_gid" "$WORK/sdconf" "$WORK/sdconf/models.yaml" "$WORK/sdconf/node-agent.yaml"
chmod 0750 "$WORK/sdconf"
chmod 0640 "$WORK/sdconf/models.yaml" "$WORK/sdconf/node-agent.yaml"
chown 0:0 "$WORK/sdconf/rolemesh.env"
chmod 0600 "$WORK/sdconf/rolemesh.env"
cp "$WORK/fake_upstream.py" "$WORK/sd/fake_upstream.py"
cat >"$WORK/sd/check.py" <<'PY'
"""Inside the systemd container: wait for the gateway and the agent's roles, then chat."""
import json, sys, time, urllib.request

key, roles = sys.argv[1], sys.argv[2:]
base = "http://127.0.0.1:8080"


def get(path, auth=False):
    req = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {key}"} if auth else {})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status, json.loads(r.read())


def wait(what, ok, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ok():
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.3)
    sys.exit(f"timed out after {timeout}s waiting for {what}")


wait("gateway /health", lambda: get("/health")[0] == 200, 40)
for model in ["planner", *roles]:
    wait(f"'{model}' in /v1/models", lambda: model in [m["id"] for m in get("/v1/models", True)[1]["data"]], 120)
    body = json.dumps({"model": model, "max_tokens": 8,
                       "messages": [{"role": "user", "content": "Say hi"}]}).encode()
    req = urllib.request.Request(base + "/v1/chat/completions", data=body, headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        answer = json.loads(r.read())
    content = answer["choices"][0]["message"]["content"]
    print(f"{model}: {content[:40]!r}")
PY

SD="rolemesh-ct-systemd-$$"
mkdir -p "$WORK/journal"
SD_MOUNTS=(-v "$WORK/journal:/var/log/journal" -v "$WORK/sdconf:/etc/rolemesh:ro" -v "$WORK/sd/fake_upstream.py:/usr/local/lib/fake_upstream.py:ro"
    -v "$WORK/sd/check.py:/usr/local/lib/check.py:ro")
if [[ $USE_LLAMA == 1 ]]; then
    SD_MOUNTS+=(-v "$LLAMA_BIN:/opt/llama/bin/llama-server:ro" -v "$MODEL:/srv/models/tiny.gguf:ro")
fi
log "systemd container (own network namespace): systemctl start rolemesh-gateway rolemesh-node-agent"
run_ctr "$SD" --systemd=always --network none "${SD_MOUNTS[@]}" "$SD_IMAGE"

sd_journal() {
    podman exec "$SD" journalctl --no-pager -o cat -n 30 -u rolemesh-gateway -u rolemesh-node-agent >&2 2>&1 || true
}
sd_show() { podman exec "$SD" systemctl show -p "$2" --value "$1"; }

deadline=$((SECONDS + 60))
state=""
while [[ "$state" != running && "$state" != degraded ]]; do
    ((SECONDS < deadline)) || die "systemd in $SD did not come up: '$state'"
    state="$(podman exec "$SD" systemctl is-system-running --wait 2>>"$PODMAN_LOG" || true)"
    [[ "$state" == running || "$state" == degraded ]] || sleep 1
done
podman exec -d "$SD" python3 /usr/local/lib/fake_upstream.py "$SD_FAKE_PORT" >/dev/null 2>>"$PODMAN_LOG" \
    || die "could not start the fake upstream in $SD"
podman exec "$SD" systemctl start rolemesh-gateway rolemesh-node-agent \
    || { sd_journal; die "systemctl start failed"; }
roles=(writer)
if [[ $USE_LLAMA == 1 ]]; then roles+=(tiny); fi
out="$(podman exec "$SD" python3 /usr/local/lib/check.py "$CLIENT_KEY" "${roles[@]}" 2>&1)" \
    || { echo "$out" >&2; sd_journal; die "the units' gateway/agent did not serve"; }
log "  chat completions through the units: $(tr '\n' ' ' <<<"$out")"

rolemesh_uid="$(podman exec "$SD" id -u rolemesh)"
for unit in rolemesh-gateway rolemesh-node-agent; do
    pid="$(sd_show "$unit" MainPID)"
    [[ "$pid" =~ ^[0-9]+$ && "$pid" -gt 0 ]] || { sd_journal; die "$unit has no main process"; }
    uid="$(podman exec "$SD" stat -c %u "/proc/$pid")"
    [[ "$uid" -ne 0 && "$uid" == "$rolemesh_uid" ]] || die "$unit runs as uid $uid, not the rolemesh user"
done
log "  both units run as the rolemesh user (uid $rolemesh_uid)"

pid="$(sd_show rolemesh-gateway MainPID)"
podman exec "$SD" sh -c "kill -9 $pid"   # from outside systemd, like the OOM killer would
deadline=$((SECONDS + 20))
until [[ "$(sd_show rolemesh-gateway NRestarts)" -ge 1 && "$(sd_show rolemesh-gateway ActiveState)" == active &&
        "$(sd_show rolemesh-gateway MainPID)" != "$pid" ]]; do
    if ((SECONDS >= deadline)); then
        sd_journal
        die "rolemesh-gateway was not restarted after kill -9 (Restart=on-failure)"
    fi
    sleep 0.5
done
out="$(podman exec "$SD" python3 /usr/local/lib/check.py "$CLIENT_KEY" writer 2>&1)" \
    || { echo "$out" >&2; sd_journal; die "the restarted gateway did not serve"; }
log "  kill -9 of the gateway: restarted by systemd (Restart=on-failure), serving again"

# `systemctl stop` of one unit: a clean stop (SIGTERM, exit 0), no restart.
podman exec "$SD" systemctl stop rolemesh-gateway || die "systemctl stop rolemesh-gateway failed"
active="$(sd_show rolemesh-gateway ActiveState)"
result="$(sd_show rolemesh-gateway Result)"
[[ "$active" == inactive && "$result" == success ]] \
    || { sd_journal; die "rolemesh-gateway did not stop cleanly: $active/$result"; }
podman exec "$SD" systemctl start rolemesh-gateway || { sd_journal; die "systemctl start rolemesh-gateway failed"; }
out="$(podman exec "$SD" python3 /usr/local/lib/check.py "$CLIENT_KEY" writer 2>&1)" \
    || { echo "$out" >&2; sd_journal; die "the gateway did not serve again after systemctl stop/start"; }
log "  systemctl stop rolemesh-gateway: inactive, result success; started again, serving"

# A system shutdown (podman stop sends systemd SIGRTMIN+3, i.e. halt) stops every unit in one
# transaction: the agent (After= the gateway) must stop first, deregister, and both exit cleanly.
# The container's journal is on the host ($WORK/journal), readable after the container is gone.
podman exec "$SD" sh -c 'echo container-test-shutdown-marker | systemd-cat -t container-test' \
    || die "could not write to the journal in $SD"
podman stop -t 90 "$SD" >/dev/null 2>>"$PODMAN_LOG" || die "podman stop $SD failed"
# the shutdown's part of the journal, after the marker
journal="$(journalctl -D "$WORK/journal" --no-pager -o cat 2>/dev/null | sed -n '/^container-test-shutdown-marker$/,$p')"
[[ -n "$journal" ]] || die "no journal of the shutdown in $WORK/journal"
agent_stopped="$(grep -n -m1 '^Stopped rolemesh-node-agent.service' <<<"$journal" | cut -d: -f1)"
gateway_stopping="$(grep -n '^Stopping rolemesh-gateway.service' <<<"$journal" | tail -n1 | cut -d: -f1)"
if [[ -z "$agent_stopped" || -z "$gateway_stopping" ]] || ((agent_stopped > gateway_stopping)); then
    tail -n 40 <<<"$journal" >&2
    die "at shutdown the agent did not stop before the gateway (After=rolemesh-gateway.service)"
fi
grep -q "deregistered node systemd-test" <<<"$journal" \
    || { tail -n 40 <<<"$journal" >&2; die "the agent did not deregister at shutdown"; }
for unit in rolemesh-gateway rolemesh-node-agent; do
    [[ "$(grep -c "^$unit.service: Deactivated successfully" <<<"$journal")" -ge 1 ]] \
        || { tail -n 40 <<<"$journal" >&2; die "$unit did not exit cleanly at shutdown"; }
    if grep -q "^$unit.service: Failed with result" <<<"$journal"; then
        tail -n 40 <<<"$journal" >&2
        die "$unit failed at shutdown"
    fi
done
if grep -q "restarting in" <<<"$journal"; then
    tail -n 40 <<<"$journal" >&2
    die "the agent restarted a llama-server while it was being stopped"
fi
log "  system shutdown: the agent stopped first and deregistered, both exited cleanly"

log "done in $((SECONDS - T0))s"
