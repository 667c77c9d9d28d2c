#!/usr/bin/env bash
# The GPU checks of the suite on one CUDA device, in well under 5 minutes:
#   1. the device and the torch / CUDA versions,
#   2. the CUDA tests (python -m pytest -m cuda -q tests/test_cuda.py),
#   3. the training throughput of gpt2_124m with Adam, LEHI and LEHIBrid
#      (benchmarks/gpu_throughput.py; batch 8 x 1024 tokens: ~10 GiB at the peak of one
#      optimizer, under 20 GiB with all three copies resident; an H100 has ~78 GiB).
# Everything printed also goes to a log file.
#
#   bash benchmarks/gpu_check.sh [LOG]             # LOG defaults to gpu_check.log
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
#
# Exit status: 0 all passed; 2 no CUDA device; otherwise the failing step's status
# (124 when a step ran out of its time budget).
set -euo pipefail

log=$(realpath -m -- "${1:-gpu_check.log}")
python=${PYTHON:-python}
repo=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
# The scripts import the package from this checkout even where it is not pip-installed.
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

checks() {
    # Runs in the pipeline's subshell below, where the caller has errexit off: stop at the
    # first failure here.
    set -euo pipefail
    echo "== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) in $repo"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi -L
    else
        echo "nvidia-smi: not found"
    fi
    "$python" -c 'import sys, torch; print(f"python {sys.version.split()[0]} | torch {torch.__version__} | CUDA build {torch.version.cuda} | cuda available: {torch.cuda.is_available()}")'
    if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "gpu_check: torch sees no CUDA device; nothing to check" >&2
        return 2
    fi
    "$python" -c 'import torch; print(f"device: {torch.cuda.get_device_name()} | cuDNN {torch.backends.cudnn.version()}")'

    echo "== CUDA tests"
    timeout 120 "$python" -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py

    echo "== training throughput"
    timeout 150 "$python" benchmarks/gpu_throughput.py --size gpt2_124m --batch 8 --context 1024 \
        --steps 20 --warmup 5 --repeats 3 --optimizers adam,lehi,lehibrid
    echo "== gpu_check: all passed"
}

# Written to LOG.partial as it goes (kept if the run is killed), renamed when done.
tmp="$log.partial"
set +e
checks 2>&1 | tee "$tmp"
status=${PIPESTATUS[0]}
set -e
mv -f -- "$tmp" "$log"
echo "log: $log (exit status $status)"
exit "$status"
