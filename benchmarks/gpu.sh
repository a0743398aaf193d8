#!/usr/bin/env bash
# The GPU figures in one short run (about 9 minutes on one H100): the CUDA tests, then the
# server-step, tenants and link benches with the server on CUDA (edge daemons on the CPUs), and the
# large-model figures: a Llama-3-8B shape (random weights) in bf16 and NF4 against PEFT LoRA/QLoRA,
# the projected packets' S = 0 against S = 1, and the byte model of an 8B step.
#
#   benchmarks/gpu.sh [MODEL]    MODEL: smollm2-135m (default), an HF directory, or random:DIR
#                                (DIR's architecture and tokenizer with random weights: timings and
#                                memory hold, exact match does not)
# Logs and each bench's JSON line go to $OUT (default out/gpu).
set -uo pipefail
MODEL=${1:-smollm2-135m}
OUT=${OUT:-out/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if ! $PY -c "import colaflow" 2>/dev/null; then  # a bare machine: run this checkout as the package
  pp=$(mktemp -d)
  cp -r runtime "$pp/colaflow" && cp -r server "$pp/colaflow/server" && cp -r edge_client "$pp/colaflow/edge_client"
  export PYTHONPATH="$pp${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
$PY -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_host.py 2>&1 | tee "$OUT/tests.log" | tail -3
for bench in server-step tenants; do
  echo "== $bench"
  timeout 120 $PY -m colaflow.cli.main bench $bench --model "$MODEL" --device cuda --repeats 10 2>&1 \
    | tee "$OUT/$bench.log" | grep -v Warning
done
echo "== link"
timeout 200 $PY -m colaflow.cli.main bench link --model "$MODEL" --device cuda --server-threads 4 \
  --codecs raw,int8,int4 --steps 12 --quick 2>&1 | tee "$OUT/link.log" | grep -v Warning
echo "== bytes (llama-3-8b)"
timeout 60 $PY -m colaflow.cli.main bench link --shape llama-3-8b 2>&1 | tee "$OUT/bytes.log" | tail -12
echo "== scale (llama-3-8b, bf16 and nf4 against PEFT)"
timeout 240 $PY -m colaflow.cli.main bench scale --shape llama-3-8b --device cuda --rows 8 --tokens 2048 \
  --repeats 3 2>&1 | tee "$OUT/scale.log" | grep -v Warning
tail -qn1 "$OUT"/server-step.log "$OUT"/tenants.log "$OUT"/link.log "$OUT"/bytes.log "$OUT"/scale.log \
  | grep '^{' > "$OUT/figures.jsonl"  # a bench cut by its timeout has no JSON line
