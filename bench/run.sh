#!/usr/bin/env bash
# RoleMesh benchmark suite: one command.
#
#   bash bench/run.sh            full run (~10 min): installs nginx, wrk and LiteLLM if missing
#   bash bench/run.sh --quick    CI smoke run (~30 s): 1 s per case, no LiteLLM
#   bash bench/run.sh --out docs/benchmarks-latest.md    also write the report to a file
#   bash bench/run.sh --cases soak [--soak-s 600]         the soak (only when named; ~11 min)
#
# nginx and wrk come from Debian (apt-get); LiteLLM (pinned) goes into its own venv under
# ${XDG_CACHE_HOME:-~/.cache}/rolemesh/bench-litellm-venv and never touches the project venv.
# Everything listens on 127.0.0.1 only.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${BENCH_PYTHON:-$REPO/.venv/bin/python}"
LITELLM_SPEC="litellm[proxy]==1.106.12"
LITELLM_VENV="${BENCH_LITELLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/rolemesh/bench-litellm-venv}"

log() { printf '[bench] %s\n' "$*" >&2; }

quick=0
cases=""
prev=""
for arg in "$@"; do
    case "$arg" in
        --quick) quick=1 ;;
        --with-litellm) quick=0 ;;  # a quick run that asks for LiteLLM still needs it installed
        --cases=*) cases="${arg#--cases=}" ;;
    esac
    [[ "$prev" == "--cases" ]] && cases="$arg"
    prev="$arg"
done
# LiteLLM is measured only in the non-streaming case: a run of other cases (the soak) needs none.
if [[ -n "$cases" && ",$cases," != *",non-streaming,"* ]]; then
    quick=1
fi

if [[ ! -x "$PYTHON" ]]; then
    log "no project Python at $PYTHON: create the venv first (python3.11 -m venv .venv && .venv/bin/pip install -e '.[dev]'), or set BENCH_PYTHON"
    exit 2
fi

# -- nginx and wrk (Debian packages) -------------------------------------------------------------
need=()
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || need+=(nginx)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
if ((${#need[@]})); then
    sudo=""
    [[ $(id -u) -ne 0 ]] && sudo="sudo"
    log "installing ${need[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! $sudo apt-get install -y -q "${need[@]}" >&2; then
        log "install failed; running apt-get update once and retrying"
        $sudo apt-get update -q >&2
        $sudo apt-get install -y -q "${need[@]}" >&2
    fi
fi

# -- LiteLLM in its own venv (full runs only) ------------------------------------------------------
if ((quick == 0)); then
    if [[ ! -x "$LITELLM_VENV/bin/litellm" ]] \
        || ! "$LITELLM_VENV/bin/python" -c 'import importlib.metadata as m, sys; sys.exit(m.version("litellm") != "1.106.12")' 2>/dev/null; then
        log "installing $LITELLM_SPEC into $LITELLM_VENV (a few minutes, once)"
        base="$("$PYTHON" -c 'import sys; print(sys._base_executable)')"
        mkdir -p "$(dirname "$LITELLM_VENV")"
        "$base" -m venv "$LITELLM_VENV"
        "$LITELLM_VENV/bin/pip" install -q --disable-pip-version-check "$LITELLM_SPEC" >&2
    fi
    export BENCH_LITELLM_VENV="$LITELLM_VENV"
fi

# More sockets than the default 1024: 1,000 streams need two each in the gateway.
ulimit -n 16384 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cd "$REPO"
exec "$PYTHON" -m bench.harness "$@"
