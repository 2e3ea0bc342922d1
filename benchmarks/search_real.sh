#!/usr/bin/env bash
# A real per-module search on the example proxy (examples/base.json: 4 layers, width 256,
# 200 iterations of 16 x 128 byte tokens of Shakespeare):
#   1. tune the global LR multiplier (space global, 12 trials)
#   2. kronecker (type x depth) LR search started from the best global LR (36 trials)
#   3. export the best base.json and plot both studies (cdp-search-report)
# Usage: benchmarks/search_real.sh [OUT_DIR] [WORKERS]   (needs the corpus: cdp-prepare-corpus)
set -euo pipefail
OUT=${1:-runs/search}
WORKERS=${2:-1}
PY=${PYTHON:-python}
mkdir -p "$OUT"
PROXY=(--num-layers 4 --hidden-size 256 --num-attention-heads 4 --ffn-hidden-size 704
  --seq-length 128 --max-position-embeddings 128 --micro-batch-size 16 --global-batch-size 16
  --train-iters 200 --normalization RMSNorm --swiglu --qk-layernorm --position-embedding-type rope
  --untie-embeddings-and-output-weights --disable-bias-linear --hidden-dropout 0 --attention-dropout 0
  --make-vocab-size-divisible-by 192 --tokenizer-type ByteTokenizer
  --data-path data/shakespeare_text_document --split 949,50,1 --eval-interval 200 --eval-iters 8
  --log-interval 50 --seed 1234)
COMMON=(--storage "sqlite:///$OUT/search.db" --output-dir "$OUT" --workers "$WORKERS" --seed 0
  --patience 6 --trial-timeout 600)
time "$PY" -m cdp_megatron.search.cli --base examples/base.json --space global --search lr \
  --trials 12 --study global-lr "${COMMON[@]}" --export "$OUT/best_global.json" -- "${PROXY[@]}"
time "$PY" -m cdp_megatron.search.cli --base examples/base.json --space kronecker --search lr \
  --init-from global-lr --trials 36 --study kron-lr "${COMMON[@]}" --export "$OUT/best_kronecker.json" \
  -- "${PROXY[@]}"
"$PY" -m cdp_megatron.search.report --storage "sqlite:///$OUT/search.db" --output "$OUT/report"
