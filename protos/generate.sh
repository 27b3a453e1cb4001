#!/bin/sh
# Regenerate app/reapi/gen/ from protos/ (see protos/README.md). Extra args go to generate.py (--check).
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
exec "$PY" protos/generate.py "$@"
