#!/usr/bin/env bash
# Wheels that bench/gpu_check.sh needs beside the GPU machine's own torch (its image has numpy,
# typer and pytest but not faiss-cpu or polars), for its Python 3.12, into .whl/ (.gitignore
# holds it): name .whl in the run's carry. polars 1.33.1 is one 40 MB wheel (polars 2 splits into a
# 54 MB runtime that, with faiss, would not fit the 64 MiB a run carries); the GPU-side code
# and tests run on it (two ingestion tests' error wording differs; they are not run there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl faiss-cpu==1.15.1 polars==1.33.1
ls -la .whl
