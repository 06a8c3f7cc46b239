#!/usr/bin/env bash
# The GPU checks of issue 18 in one script: the Pallas kernels run against their
# references, the MoE layer and grouped matmul timed, training throughput and MFU.
#
#   bash experiments/accelerator_checks.sh OUTDIR [STEPS]
#
# STEPS: a comma-separated subset of env,kernels,layer,train_small,train_1b (default all).
# Backends run pallas last, so a kernel that fails still leaves the XLA figures. Each step
# runs under its own time limit and writes OUTDIR/<step>.log, and JSON where the binary
# writes one (the figures with the command, device, jax version and date); a failed step
# does not stop the next. The last lines printed are every step's summary lines and exit
# status.
set -u
OUT=${1:?usage: accelerator_checks.sh OUTDIR [STEPS]}
STEPS=${2:-env,kernels,layer,train_small,train_1b}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
declare -A STATUS

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  [[ ",$STEPS," == *",$name,"* ]] || return 0
  echo "=== $name (limit ${limit} s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  STATUS[$name]="exit $? after $((SECONDS - t0)) s"
  grep -E "summary|rel_err|ratio=|tflops|tokens/s|Error|error:" "$OUT/$name.log" | tail -40
}

step env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv; $PY -c 'import jax, jaxlib, flax, optax; print(\"jax\", jax.__version__, \"jaxlib\", jaxlib.__version__, \"flax\", flax.__version__, \"optax\", optax.__version__); print(jax.devices())'"
# Every kernel, forward and backward, at a coarse and a fine-grained shape, float32 and bf16.
step kernels 100 bash -c "$PY -m experiments.check_kernels --run --dtypes=float32,bfloat16 --seeds=1 --T=4096 --d=1024 --f=512 --E=8 --k=2 --out=$OUT/kernels_coarse.json; $PY -m experiments.check_kernels --run --dtypes=float32,bfloat16 --seeds=1 --T=4096 --d=512 --f=128 --E=64 --k=8 --out=$OUT/kernels_fine.json"
# The layer against a dense SwiGLU of equal active FLOPs, the two shapes at GPU size;
# the grouped matmul against ragged_dot and a dense matmul, at several Triton tilings.
step layer 120 $PY -m experiments.bench_moe --T=32768 --d=2048 --shapes=8:1024:2,64:128:8 \
  --dtype=bfloat16 --backend=dropless,capacity,pallas --repeats=5 --out="$OUT/layer.json" --gmm \
  --gmm_tilings=64:64:64:4:3,128:64:128:8:3,128:128:128:8:3
step train_small 130 $PY -m experiments.bench_train --model=smollm2-135m --experts=0,8 \
  --backend=dropless,pallas --B=16 --L=2048 --out="$OUT/train_small.json"
step train_1b 150 bash -c "$PY -m experiments.bench_train --model=llama-1b --experts=0 --B=8 --L=2048 --out=$OUT/train_1b_dense.json && $PY -m experiments.bench_train --model=llama-1b --experts=8 --backend=pallas --remat=full --B=8 --L=2048 --out=$OUT/train_1b_moe.json"

echo "=== summary"
for name in env kernels layer train_small train_1b; do
  [[ -n "${STATUS[$name]:-}" ]] && echo "$name: ${STATUS[$name]}"
done
grep -h "summary\|FAIL" "$OUT"/*.log
