#!/usr/bin/env bash
# The prepared GPU check (benchmarks/README.md): sized to fit in 10 minutes on one H200.
#
#   benchmarks/gpu_check.sh MNIST_MIRROR [WHEELS] [-- extra gpu_check.py arguments]
#   benchmarks/gpu_check.sh --smoke MNIST_MIRROR        # the same on the CPU, in seconds
#
# Run from anywhere; it works in the repository root. MNIST_MIRROR: a folder with the four
# MNIST archives (*-ubyte.gz). Python: $PYTHON, else .venv/bin/python, else python3. What
# that Python lacks of the project's runtime needs (pydantic, hydra-core, faiss) is
# installed offline from WHEELS (default .whl/; make it with --fetch-wheels DIR on a machine
# with internet) into a scratch folder put on PYTHONPATH: the project itself runs from
# source, so nothing is built. DVC and MLflow are not needed: the full run calls the stages
# directly, untracked. Output: the check's markdown on stdout, also written with its JSON to
# $OUT (or gpu_check_out/) as gpu_check.md and gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=()
if [[ "${1:-}" == "--smoke" ]]; then smoke=(--smoke); shift; fi

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  # Wheels for the GPU machine's Python (3.12, x86-64 Linux) of the packages its image
  # lacks, at the versions this environment has; antlr4 (hydra's parser) ships no wheel,
  # so one is built (pure Python).
  dest=${2:?usage: $0 --fetch-wheels DIR}
  py=${PYTHON:-python3}
  pins=$("$py" -c 'from importlib.metadata import version as v
print(" ".join(f"{n}=={v(n)}" for n in ("pydantic", "pydantic-core", "annotated-types",
      "typing-inspection", "hydra-core", "omegaconf", "faiss-cpu")))')
  # shellcheck disable=SC2086
  "$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dest" $pins
  "$py" -m pip wheel --no-deps -w "$dest" "antlr4-python3-runtime==4.9.3"
  du -sh "$dest"
  exit 0
fi

mirror=${1:?usage: $0 [--smoke] MNIST_MIRROR [WHEELS] [-- gpu_check.py arguments]}
shift
wheels=.whl
if [[ $# -gt 0 && "$1" != "--" ]]; then wheels=$1; shift; fi
if [[ "${1:-}" == "--" ]]; then shift; fi

py=${PYTHON:-}
if [[ -z "$py" ]]; then
  if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
fi
if ! "$py" -c "import pydantic, hydra, faiss" 2>/dev/null; then
  if ! compgen -G "$wheels/*.whl" >/dev/null; then
    echo "error: $py lacks pydantic, hydra-core or faiss, and $wheels holds no wheels;" \
         "make them with: $0 --fetch-wheels $wheels" >&2
    exit 2
  fi
  site=$(mktemp -d)
  "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out=${OUT:-gpu_check_out}
mkdir -p "$out"

if [[ ${#smoke[@]} -eq 0 ]] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi
if [[ ${#smoke[@]} -eq 0 ]]; then
  # the CUDA-only tests (skipped on CPU machines): one epoch syncs once, GPU augmentation
  # equals the CPU's, faiss GPU distances equal the CPU's (when faiss is a GPU build)
  "$py" -m pytest -q -p no:cacheprovider tests/test_gpu_path.py tests/test_augment.py \
    -k "cuda" 2>&1 | tail -n 15 || true
fi
"$py" benchmarks/gpu_check.py "${smoke[@]}" --mirror "$mirror" --json "$out/gpu_check.json" \
  "$@" | tee "$out/gpu_check.md"
