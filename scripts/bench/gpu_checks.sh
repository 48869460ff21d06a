#!/usr/bin/env bash
# The checks that need the GPU machine, for a session lent one (15 minutes of it, at most 10 a call): two parts,
# each one call.
#
#     PYTHON=python3 bash scripts/bench/gpu_checks.sh gpu 2>&1 | tee gpu.log     # ~5 min on one H200
#     PYTHON=python3 bash scripts/bench/gpu_checks.sh cores 2>&1 | tee cores.log # ~6 min: its 16 cores, no GPU used
#
# gpu, each step under a time limit so that one hang cannot eat the rest:
#   1. tests/test_cuda.py: snapshots into pinned buffers on a side stream, no per-step host sync on the training
#      thread (torch's sync debug mode), 16-mixed and bf16-mixed, NCCL with one rank;
#   2. `trainbus run` on CUDA in 16-mixed (with the gpu monitor and the checkpoint plugin) and bf16-mixed, and
#      --nproc 2 on the one GPU (refused in one line);
#   3. scripts/bench/checkpoint_stall.py --device cuda: the snapshot stall vs the pinned copy, first vs later;
#   4. scripts/bench/vs_lightning.py --device cuda: the launch-bound model (noisy: more repetitions) and the
#      compute-bound one (steady: fewer).
# cores: the CPU benches whose targets need cores to spare, which the 2-core VM has not (issues #12 and #14):
#   5. scripts/bench/attach_monitors.py: 50 attached monitors on cores of their own;
#   6. scripts/bench/ddp_overhead.py --quick: trainbus vs a bare DDP loop, 2 ranks, the plugins on spare cores.
# The project must be importable by $PYTHON (pip install -e . --no-deps where torch is already there).
set -u
PY=${PYTHON:-python3}
RUNS=$(mktemp -d /tmp/trainbus-gpu-checks.XXXXXX)
step() {
    local limit=$1; shift
    echo "== $(date +%T) $*"
    timeout -k 10 "$limit" "$@"
    echo "== rc=$? ($(date +%T))"
}
MODE=${1:-gpu}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PY" -c "import torch, zmq; print('python', __import__('sys').version.split()[0], 'torch', torch.__version__, 'cuda',
torch.version.cuda, torch.cuda.get_device_name(), 'pyzmq', zmq.__version__, 'cores', __import__('os').cpu_count())"
if [ "$MODE" = cores ]; then
    step 300 "$PY" scripts/bench/attach_monitors.py --repeats 2 --epochs 150
    step 200 "$PY" scripts/bench/ddp_overhead.py --quick
    rm -rf "$RUNS"
    exit
fi
step 240 "$PY" -m pytest -q -o addopts="" -p no:cacheprovider -rs --durations=10 tests/test_cuda.py
step 90 "$PY" -m trainbus.kernel.cli run --device cuda --precision 16-mixed --epochs 3 --runs-dir "$RUNS" \
    --plugins console,metrics_log,gpu,checkpoint
step 30 "$PY" -m trainbus.kernel.cli runs show "$(ls -t "$RUNS" | grep -v registry | head -1)" --runs-dir "$RUNS"
step 60 "$PY" -m trainbus.kernel.cli run --device cuda --precision bf16-mixed --epochs 3 --runs-dir "$RUNS"
# one GPU by its index; one past the last: one line (exit 2)
step 60 "$PY" -m trainbus.kernel.cli run --device cuda:0 --epochs 1 --runs-dir "$RUNS" --plugins console
step 60 "$PY" -m trainbus.kernel.cli run --device cuda:9 --epochs 1 --runs-dir "$RUNS" --plugins console
# more processes than the one GPU: one line naming the fix (exit 2), not CUDA's "invalid device ordinal"
step 90 "$PY" -m trainbus.kernel.cli run --device cuda --nproc 2 --epochs 1 --runs-dir "$RUNS" --plugins console
# a snapshot every ~3 s (1000 steps of ~3 ms), past the persist (~2 s) and the buffers' preparation
step 150 "$PY" scripts/bench/checkpoint_stall.py --device cuda --dir "$RUNS" --batch 16 --steps 4000 --every 1000 \
    --baseline-steps 300 --pairs 2 --overload-steps 0 --reps 5 --inline-reps 1
step 240 "$PY" scripts/bench/vs_lightning.py --device cuda --only launch-bound --reps 5
step 120 "$PY" scripts/bench/vs_lightning.py --device cuda --only compute-bound --reps 3 --epochs 6
rm -rf "$RUNS"
