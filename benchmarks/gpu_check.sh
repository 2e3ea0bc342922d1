#!/usr/bin/env bash
# The GPU checks of the Megatron-Core integration in one bounded run, for a machine that has
# a GPU but no network (wheels carried in), writing one log per check and a summary:
#   1. tests/integration/test_grouped_adam.py: the grouped Adam step bit-identical to torch's
#      own Adam/AdamW per group and segment, its CUDA cases included (both sqrt paths);
#   2. benchmarks/optimizer_overhead.py at 16 layers x 1024, every group distinct vs global
#      HPs and vs Megatron's own optimizer: bf16 with the distributed optimizer at 8 x 512
#      tokens per step (the worst small-step ratio measured before), fp32 at 4 x 64 and
#      8 x 512, and --lr-only at 8 x 512;
#   3. benchmarks/loss_memory.py on bf16 logits of 4 x 2048 tokens x a 128k vocabulary: the peak
#      GPU memory and time of the fused loss (--cross-entropy-loss-fusion) over autograd's;
#   4. last (least telling for the ratio): a short bf16 cdp-pretrain run on CUDA with the
#      logging of the newer Megatron-LM flags (--log-params-norm, --log-num-zeros-in-grad,
#      --log-throughput, --log-memory-to-tensorboard), a torch.profiler trace of iterations
#      11-12 with CUDA activity (--profile --use-pytorch-profiler), norm/MLP recomputation
#      (--recompute-modules), --manual-gc, DataLoader workers (--num-workers) and the fused loss,
#      none of which has run on a GPU yet.
#
# Usage: benchmarks/gpu_check.sh [OUT_DIR] [WHEELS_DIR]
#   OUT_DIR     logs and summary.txt (default: $OUT if set, else runs/gpu-check)
#   WHEELS_DIR  wheels to install first when megatron-core is missing (default: .whl), e.g.
#               made on a machine with network access (python 3.12, x86-64):
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.19.2
# The whole run stays within GPU_CHECK_BUDGET seconds (default 540, under a 10-minute call),
# the most telling checks first; each check has its own time limit as well (CHECK_TIMEOUT
# seconds, default 150, cut to what is left of the budget). A check that fails or runs out of
# time is reported in the summary and the others still run; one left no time is reported as
# not run. Exit status: the number of checks that failed or did not run (0: all passed). BENCH_SHAPE replaces the benchmarks' model flags
# (default "--layers 16 --hidden 1024 --steps 30"), LOSS_SHAPE the loss benchmark's (default "--batch 4
# --seq 2048 --vocab 131072 --rounds 6"), PRETRAIN_SHAPE the last check's model flags
# (default "--num-layers 4 --hidden-size 256 --num-attention-heads 4 --seq-length 256"); GPU_CHECK_ON_CPU=1 runs the script
# without a GPU, to try the script itself (the figures then are CPU figures).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-runs/gpu-check}}
WHEELS=${2:-.whl}
PY=${PYTHON:-python3}
LIMIT=${CHECK_TIMEOUT:-150}
DEADLINE=$(($(date +%s) + ${GPU_CHECK_BUDGET:-540}))
export PYTHONUNBUFFERED=1
has_cuda() { "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
if [ "${GPU_CHECK_ON_CPU:-0}" != 1 ] && ! has_cuda; then
  echo "gpu_check: torch sees no CUDA device here; these checks need a GPU (run the CPU suite instead)" >&2
  exit 1
fi
if ! "$PY" -c 'import megatron.core' 2>/dev/null; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu_check: megatron-core is not installed and $WHEELS holds no wheels; install it or pass WHEELS_DIR" >&2
    exit 1
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/cdp-gpu-site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/cdp-gpu-site${PYTHONPATH:+:$PYTHONPATH}
fi
# the refusals above leave no output behind
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }

if ! "$PY" -c 'import cdp_megatron.patches' 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$OUT_DIR/install.log" 2>&1 || {
    echo "gpu_check: could not install cdp-megatron (see $OUT_DIR/install.log)" >&2; exit 1; }
fi
say "gpu_check $(date -u +%FT%TZ): $("$PY" -W ignore -c 'import torch, megatron.core as m; d = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"; print(f"torch {torch.__version__}, megatron-core {m.__version__}, {d}")' 2>/dev/null)"
say "  host CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores"

FAILED=0
check() {  # check NAME COMMAND...: run with the time limit, log to NAME.log, grep the figures
  local name=$1 rc start limit
  shift
  start=$(date +%s)
  limit=$((DEADLINE - start))
  if [ "$limit" -lt 5 ]; then
    FAILED=$((FAILED + 1))
    say "== $name: NOT RUN (the ${GPU_CHECK_BUDGET:-540} s budget is spent)"
    return
  fi
  [ "$limit" -gt "$LIMIT" ] && limit=$LIMIT
  timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  rc=$?
  if [ "$rc" -eq 0 ]; then
    say "== $name: ok ($(($(date +%s) - start)) s)"
  else
    FAILED=$((FAILED + 1))
    say "== $name: FAILED, exit $rc$([ "$rc" -eq 124 ] && echo " (over ${limit} s)") ($(($(date +%s) - start)) s)"
  fi
  grep -E "passed|failed|error|^device=|param groups|ratio|from its parts|deterministic reruns" "$OUT_DIR/$name.log" \
    | grep -v -i "warn" | sed 's/^/  /' | tee -a "$SUMMARY"
}

read -r -a SHAPE <<<"${BENCH_SHAPE:---layers 16 --hidden 1024 --steps 30}"
BENCH=("$PY" benchmarks/optimizer_overhead.py "${SHAPE[@]}")
check grouped_adam_tests "$PY" -m pytest -q -p no:cacheprovider tests/integration/test_grouped_adam.py
check bench_bf16_distopt_8x512 "${BENCH[@]}" --batch 8 --seq 512 --bf16 --dist-opt
check bench_fp32_4x64 "${BENCH[@]}"
check bench_fp32_8x512 "${BENCH[@]}" --batch 8 --seq 512
check bench_lr_only_8x512 "${BENCH[@]}" --batch 8 --seq 512 --lr-only
read -r -a LOSS_SHAPE <<<"${LOSS_SHAPE:---batch 4 --seq 2048 --vocab 131072 --rounds 6}"
check loss_memory_bf16_128k "$PY" benchmarks/loss_memory.py --bf16 "${LOSS_SHAPE[@]}"
read -r -a PRETRAIN_SHAPE <<<"${PRETRAIN_SHAPE:---num-layers 4 --hidden-size 256 --num-attention-heads 4 --seq-length 256}"
GPU_ONLY=()  # GPU memory and a CUDA profile only where there is a GPU (a CPU run refuses the memory flag)
has_cuda && GPU_ONLY=(--log-memory-to-tensorboard --tensorboard-dir "$OUT_DIR/pretrain_tb" --profile --use-pytorch-profiler)
check pretrain_bf16_logging_recompute "$PY" -m cdp_megatron.pretrain --mock-data --vocab-size 1000 "${PRETRAIN_SHAPE[@]}" \
  --micro-batch-size 4 --train-iters 20 --lr 1e-3 \
  --eval-iters 0 --log-interval 10 --bf16 --disable-bias-linear --swiglu --normalization RMSNorm \
  --log-params-norm --log-num-zeros-in-grad --log-throughput --recompute-activations \
  --recompute-modules core_attn mlp layernorm --manual-gc --manual-gc-interval 10 --num-workers 2 --empty-unused-memory-level 2 \
  --cross-entropy-loss-fusion \
  "${GPU_ONLY[@]}" --metrics-file "$OUT_DIR/pretrain_metrics.jsonl"
grep -h "iteration 20/20" "$OUT_DIR/pretrain_bf16_logging_recompute.log" 2>/dev/null | sed 's/^/  /' | tee -a "$SUMMARY"
if [ -d "$OUT_DIR/pretrain_tb" ]; then  # the last GPU memory point of each kind
  "$PY" - "$OUT_DIR/pretrain_tb" <<'PYEOF' 2>&1 | sed 's/^/  /' | tee -a "$SUMMARY"
import sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1])
acc.Reload()
for tag in sorted(t for t in acc.Tags()["scalars"] if t.startswith("memory/")):
    last = acc.Scalars(tag)[-1]
    print(f"{tag} at iteration {last.step}: {last.value:.6g}")
PYEOF
fi
# --deterministic-mode on a GPU: two runs of one command, bit-identical (NCCL_ALGO=Ring, cuBLAS workspace)
check deterministic_reruns "$PY" benchmarks/deterministic_reruns.py --out "$OUT_DIR/deterministic" -- \
  --mock-data --vocab-size 1000 "${PRETRAIN_SHAPE[@]}" --micro-batch-size 4 --train-iters 10 --lr 1e-3 \
  --eval-iters 0 --log-interval 1 --bf16 --disable-bias-linear --swiglu --normalization RMSNorm --transformer-impl local
say "gpu_check: $FAILED check(s) failed or not run; logs in $OUT_DIR"
exit "$FAILED"
