#!/usr/bin/env bash
# Release check: build the sdist and the wheel the way a release would, check what is in them,
# install the wheel into a fresh venv and run the installed programs from outside the repo.
#
#   bash scripts/release_check.sh          exits non-zero on the first failed check
#
# Steps:
#   1. copy the tracked (and untracked, not ignored) files to a temp dir, so stale build/ or
#      *.egg-info dirs of the work tree cannot leak into the release;
#   2. `python -m build` (sdist, then the wheel built from that sdist) with `build` installed
#      into a throwaway venv (it is not a project dependency);
#   3. the sdist holds README.md, pyproject.toml and every module of the package; the wheel holds
#      every module, both console scripts, and no tests/;
#   4. a fresh venv gets the wheel (dependencies from the index pip is configured with);
#      rolemesh-gateway / rolemesh-node-agent --help and --version (the version must be the
#      wheel's), the package imports from the venv, not the repo;
#   5. the guide's `ROLE_MESH_CONFIG=configs/models.yaml uvicorn rolemesh_gateway.main:app` and
#      `rolemesh-gateway --config ... --port ...` each start on a free 127.0.0.1 port from a
#      directory outside the repo and answer GET /health with 200; then they are stopped.
#
# Knobs: PYTHON (default python3), ROLE_MESH_KEEP_RELEASE_DIR=1 keeps the temp dir.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/rolemesh-release.XXXXXX")"
SERVER_PID=""

step() { printf '==> %s\n' "$*" >&2; }
fail() { printf 'release check FAILED: %s\n' "$*" >&2; exit 1; }

cleanup() {
    if [[ -n "$SERVER_PID" ]]; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if [[ "${ROLE_MESH_KEEP_RELEASE_DIR:-}" == 1 ]]; then
        echo "kept $WORK" >&2
    else
        rm -rf -- "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

command -v "$PYTHON" >/dev/null 2>&1 || fail "$PYTHON not found"
unset PYTHONPATH

# 1. a clean copy of the source
step "copying the source tree to $WORK/src"
mkdir -p "$WORK/src"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
        | (cd "$ROOT" && xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh) \
        | tar -C "$ROOT" --null -T - -cf - | tar -C "$WORK/src" -xf -
else
    tar -C "$ROOT" --exclude=.venv --exclude=.git --exclude='*.egg-info' --exclude=build \
        --exclude=dist --exclude=__pycache__ -cf - . | tar -C "$WORK/src" -xf -
fi
[[ -f "$WORK/src/pyproject.toml" ]] || fail "no pyproject.toml in the copied tree"

# 2. sdist and wheel
step "installing 'build' into a throwaway venv"
"$PYTHON" -m venv "$WORK/build-venv"
"$WORK/build-venv/bin/pip" install -q --disable-pip-version-check build
step "python -m build (sdist, then the wheel from the sdist)"
"$WORK/build-venv/bin/python" -m build --outdir "$WORK/dist" "$WORK/src" >"$WORK/build.log" 2>&1 \
    || { tail -n 40 "$WORK/build.log" >&2; fail "python -m build failed"; }
shopt -s nullglob
sdists=("$WORK"/dist/*.tar.gz)
wheels=("$WORK"/dist/*.whl)
shopt -u nullglob
[[ ${#sdists[@]} -eq 1 ]] || fail "expected one sdist in $WORK/dist, found ${#sdists[@]}"
[[ ${#wheels[@]} -eq 1 ]] || fail "expected one wheel in $WORK/dist, found ${#wheels[@]}"
SDIST="${sdists[0]}"
WHEEL="${wheels[0]}"
echo "    $(basename "$SDIST") ($(du -h "$SDIST" | cut -f1)), $(basename "$WHEEL") ($(du -h "$WHEEL" | cut -f1))" >&2

# 3. contents
step "checking the contents of the sdist and the wheel"
VERSION="$("$PYTHON" - "$WHEEL" "$SDIST" "$WORK/src" <<'PY'
import sys, tarfile, zipfile
from pathlib import Path

wheel, sdist, src = sys.argv[1], sys.argv[2], Path(sys.argv[3])
errors = []
modules = sorted(p.relative_to(src).as_posix() for p in (src / "rolemesh_gateway").rglob("*.py"))
if "rolemesh_gateway/__init__.py" not in modules:
    errors.append("the source tree has no rolemesh_gateway/__init__.py")

with tarfile.open(sdist) as t:
    names = t.getnames()
top = names[0].split("/")[0]
in_sdist = {n[len(top) + 1:] for n in names if n.startswith(top + "/")}
for need in ["README.md", "pyproject.toml", "PKG-INFO", *modules]:
    if need not in in_sdist:
        errors.append(f"sdist {Path(sdist).name} lacks {need}")

with zipfile.ZipFile(wheel) as z:
    in_wheel = set(z.namelist())
    dist_info = next((n.split("/")[0] for n in in_wheel if n.split("/")[0].endswith(".dist-info")), None)
    if dist_info is None:
        errors.append("the wheel has no .dist-info")
        meta, entry_points = "", ""
    else:
        meta = z.read(f"{dist_info}/METADATA").decode()
        entry_points = z.read(f"{dist_info}/entry_points.txt").decode() \
            if f"{dist_info}/entry_points.txt" in in_wheel else ""
for m in modules:
    if m not in in_wheel:
        errors.append(f"wheel lacks {m}")
tests = sorted(n for n in in_wheel if n.split("/")[0] in ("tests", "test"))
if tests:
    errors.append(f"wheel contains tests: {tests[:5]}")
stray = sorted({n.split("/")[0] for n in in_wheel} - {"rolemesh_gateway", dist_info})
if stray:
    errors.append(f"wheel has top-level entries besides the package: {stray}")
for script in ("rolemesh-gateway", "rolemesh-node-agent"):
    if f"{script} =" not in entry_points and f"{script}=" not in entry_points:
        errors.append(f"wheel declares no console script {script}")
version = next((line.split(":", 1)[1].strip() for line in meta.splitlines()
                if line.startswith("Version:")), "")
if not version:
    errors.append("no Version: in the wheel's METADATA")
if "# RoleMesh Gateway" not in meta:
    errors.append("the wheel's METADATA does not carry README.md as the long description")
for e in errors:
    print(f"  {e}", file=sys.stderr)
if errors:
    sys.exit(1)
print(version)
PY
)" || fail "sdist / wheel contents (see above)"
echo "    version $VERSION; sdist has README.md and the package, wheel has no tests/" >&2

# 4. install and run the programs
step "installing the wheel into a fresh venv"
VENV="$WORK/venv"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check "$WHEEL" >"$WORK/install.log" 2>&1 \
    || { tail -n 40 "$WORK/install.log" >&2; fail "pip install of the wheel failed"; }

RUN_DIR="$WORK/run"   # outside the repo: only the installed package can be imported
mkdir -p "$RUN_DIR"
cd "$RUN_DIR"

where="$("$VENV/bin/python" -c 'import rolemesh_gateway; print(rolemesh_gateway.__file__)')"
[[ "$where" == "$VENV"/* ]] || fail "rolemesh_gateway imports from $where, not from the venv"

for prog in rolemesh-gateway rolemesh-node-agent; do
    step "$prog --help / --version"
    [[ -x "$VENV/bin/$prog" ]] || fail "the wheel installed no $prog"
    "$VENV/bin/$prog" --help >"$WORK/help.txt" 2>&1 || { cat "$WORK/help.txt" >&2; fail "$prog --help failed"; }
    grep -qi "usage" "$WORK/help.txt" || { cat "$WORK/help.txt" >&2; fail "$prog --help printed no usage"; }
    out="$("$VENV/bin/$prog" --version 2>&1)" || fail "$prog --version failed: $out"
    [[ "$out" == *"$VERSION"* ]] || fail "$prog --version printed '$out', not the wheel's version $VERSION"
    echo "    $out" >&2
done

free_port() {
    "$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# serve_check NAME PORT LOG CMD...: start CMD in the background, wait for GET /health == 200, stop it.
serve_check() {
    local name="$1" port="$2" log="$3"
    shift 3
    "$@" >"$log" 2>&1 &
    local pid=$!
    SERVER_PID=$pid
    if ! "$VENV/bin/python" - "$port" "$pid" <<'PY'
import json, os, sys, time, urllib.request
port, pid = int(sys.argv[1]), int(sys.argv[2])
url = f"http://127.0.0.1:{port}/health"
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(f"the server exited before answering {url}")
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            body = r.read()
            if r.status == 200:
                print(f"    GET {url} -> 200 {json.loads(body)}", file=sys.stderr)
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.2)
sys.exit(f"no 200 from {url} within 30 s")
PY
    then
        tail -n 30 "$log" >&2
        fail "$name did not answer GET /health with 200"
    fi
    kill -TERM "$pid"
    local rc=0
    wait "$pid" || rc=$?
    SERVER_PID=""
    # 0 is a clean exit; uvicorn may report the signal (128+15) on some versions.
    [[ $rc -eq 0 || $rc -eq 143 ]] || { tail -n 30 "$log" >&2; fail "$name exited with $rc on SIGTERM"; }
    echo "    stopped with SIGTERM (exit $rc)" >&2
}

CONFIG="$ROOT/configs/models.yaml"
[[ -f "$CONFIG" ]] || fail "$CONFIG not found"

port="$(free_port)"
step "the guide's uvicorn command on 127.0.0.1:$port (cwd $RUN_DIR)"
serve_check "uvicorn rolemesh_gateway.main:app" "$port" "$WORK/uvicorn.log" \
    env ROLE_MESH_CONFIG="$CONFIG" "$VENV/bin/uvicorn" rolemesh_gateway.main:app --host 127.0.0.1 --port "$port"

port="$(free_port)"
step "rolemesh-gateway --config ... on 127.0.0.1:$port"
serve_check "rolemesh-gateway" "$port" "$WORK/gateway.log" \
    env -u ROLE_MESH_CONFIG "$VENV/bin/rolemesh-gateway" --config "$CONFIG" --host 127.0.0.1 --port "$port"

echo "release check: OK (rolemesh-gateway $VERSION: $(basename "$SDIST"), $(basename "$WHEEL"))"
