#!/usr/bin/env bash
# The project's one test command (README and CI): lint, format check, strict types, tests.
#   bash scripts/test.sh            everything (end-to-end tests build llama-server once, cached)
#   bash scripts/test.sh -k stale   extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv" >&2
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import rolemesh_gateway, pytest, mypy, ruff, openai" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ]; then
  echo "==> installing the project and its dev tools into .venv" >&2
  .venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
  touch .venv/.installed
fi

echo "==> ruff check" >&2
.venv/bin/ruff check .
echo "==> ruff format --check" >&2
.venv/bin/ruff format --check .
echo "==> mypy (strict)" >&2
.venv/bin/mypy
echo "==> pytest" >&2
exec .venv/bin/pytest --cov=rolemesh_gateway --cov-report=term:skip-covered "$@"
