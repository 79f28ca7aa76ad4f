#!/usr/bin/env bash
# A throwaway virtual environment for bench/bench_public.py: this project beside the public
# implementations it is compared with (torch-rechub 0.9.0, deepctr-torch). Neither is a
# dependency of the project; the environment lives outside the repository.
#
#   bash bench/public_env.sh [VENV]        # default /work/bench-venv
#   VENV/bin/python bench/bench_public.py --scale full --out-dir runs/bench   # -> runs/bench/public-full.json
#
# torch==2.13.0 (the CPU build) goes in FIRST. Both public packages declare open torch ranges
# (torch-rechub 0.9.0: torch>=1.10.0; deepctr-torch 0.3.0: torch>=2.4.0), so they are installed
# with --no-deps and their real runtime dependencies are named explicitly, under a constraint
# that holds torch at 2.13.0: nothing here can make pip resolve a (multi-GB CUDA) torch.
set -euo pipefail

VENV="${1:-/work/bench-venv}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-python3}"
TORCH="torch==2.13.0"
RECHUB="torch-rechub==0.9.0"
DEEPCTR="deepctr-torch==0.3.0"

case "$(cd "$(dirname "$VENV")" 2>/dev/null && pwd)/" in
  "$REPO"/*) echo "public_env.sh: $VENV is inside the repository; give a path outside it" >&2; exit 2 ;;
esac

"$PY" -m venv "$VENV"
PIP=("$VENV/bin/pip" install -q)
FIND=()
[ -d /opt/wheels ] && FIND=(--find-links /opt/wheels)

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "$TORCH" > "$constraints"

# 1. torch, pinned, first.
"${PIP[@]}" "${FIND[@]}" "$TORCH"
# 2. the public implementations without their declared (open-ended torch) requirements ...
"${PIP[@]}" --no-deps "$RECHUB" "$DEEPCTR"
# ... and what they import at run time, torch held where it is: torch-rechub numpy pandas
# scikit-learn tqdm; deepctr-torch scikit-learn tqdm, plus requests and packaging, which it
# imports (for a PyPI version check in a thread at import, which bench_public.py stubs out)
# without declaring them.
"${PIP[@]}" "${FIND[@]}" -c "$constraints" numpy pandas scikit-learn tqdm requests packaging
# 3. this project, with its own pinned dependencies (torch==2.13.0 is already satisfied).
"${PIP[@]}" "${FIND[@]}" -c "$constraints" -e "$REPO"

"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch
import torch_rechub.models.matching, torch_rechub.models.ranking  # noqa: F401  (imports work)
import sys, types
offline = types.ModuleType("requests")  # deepctr-torch's import-time version check stays offline
offline.get = lambda *a, **k: types.SimpleNamespace(status_code=None)
offline.codes = types.SimpleNamespace(ok=200)
sys.modules["requests"] = offline
import deepctr_torch.models  # noqa: F401
import retrieval  # noqa: F401
assert torch.__version__.startswith("2.13.0"), torch.__version__
print("torch", torch.__version__, "| torch-rechub", md.version("torch-rechub"),
      "| deepctr-torch", md.version("deepctr-torch"))
PY
"$VENV/bin/pip" check
echo "ready: $VENV/bin/python bench/bench_public.py --scale full --out-dir runs/bench"
