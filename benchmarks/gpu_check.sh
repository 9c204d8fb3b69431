#!/usr/bin/env bash
# The single-GPU check (issue 16): CUDA tests + ftedge vs TRL training throughput at SmolLM2-135M
# and a ~1.7B Llama shape (random weights, real SmolLM2 tokenizer), into $OUT/gpu_check.{json,txt}.
#
# 1. Here, with network for pip (once):   make gpu-check-prepare
#    -> .whl/ (bitsandbytes, trl, datasets, ... for Python 3.12 x86-64) and .gpu-carry/ (tokenizer,
#       SmolLM2-135M config); both ignored by git, ~51 MB together.
# 2. The device call, as one command (about 5 minutes of a ~8-minute budget):
#      run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".gpu-carry"], timeout_s=540)
#    then copy files_at/gpu_check.json to benchmarks/results/gpu_check.json and give_back.
# 3. CPU dry run (what `make test` runs through tests/test_gpu_check.py; needs no wheels):
#      bash benchmarks/gpu_check.sh --dry-run --out /tmp/gpu-check
#
# Any other option goes to benchmarks/gpu_check.py (--sizes, --runs, --steps, --batch, --skip-tests).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

dry=0
for a in "$@"; do [ "$a" = "--dry-run" ] && dry=1; done

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$dry" = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
    # The carried wheels go to a temporary path in front of the machine's own packages.
    site=${FTEDGE_GPU_SITE:-/tmp/site}
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || exit 3
    export PYTHONPATH="$site:$PYTHONPATH"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
exec "$PY" benchmarks/gpu_check.py "$@"
