#!/usr/bin/env bash
# guidellm, the benchmark client of the vLLM project, against a running `adadecode serve`.
# The vLLM extensions it sends (ignore_eos, stream_options.continuous_usage_stats,
# max_completion_tokens, messages of text parts) are served (docs/serving.md#request-fields).
# Never run in CI. guidellm goes into a virtual environment of its own: it brings its own
# torch and transformers.
#
#   python -m venv ~/.venvs/guidellm && ~/.venvs/guidellm/bin/pip install guidellm
#   adadecode serve --port 8000 &                  # wait for `adadecode: ready`
#   GUIDELLM=~/.venvs/guidellm/bin/guidellm bash scripts/guidellm_run.sh
#   FORMAT=/v1/chat/completions STREAMS=8 REQUESTS=32 bash scripts/guidellm_run.sh --output kind=console
#
# Extra arguments go to `guidellm run` as they are. The tokenizer that builds the synthetic
# prompts is read from a local directory (TOKENIZER; default: the bundled model's), so
# nothing is downloaded. With a key: API_KEY (or ADADECODE_API_KEY).
set -euo pipefail
cd "$(dirname "$0")/.."

URL=${URL:-http://127.0.0.1:8000}
GUIDELLM=${GUIDELLM:-guidellm}
FORMAT=${FORMAT:-/v1/completions}      # or /v1/chat/completions
STREAMS=${STREAMS:-4}                  # requests in flight (guidellm's concurrent profile)
REQUESTS=${REQUESTS:-8}                # requests in all
PROMPT_TOKENS=${PROMPT_TOKENS:-32}
OUTPUT_TOKENS=${OUTPUT_TOKENS:-16}     # every request runs to it: guidellm sends ignore_eos
API_KEY=${API_KEY:-${ADADECODE_API_KEY:-}}
OUT=${OUT:-guidellm-$(date +%Y%m%d-%H%M%S).json}
if [ -z "${TOKENIZER:-}" ]; then
    TOKENIZER=$(python -c "from adadecode.runtime.model_source import resolve_model as r
print(r('bundled:smollm2-135m-instruct').path)")
fi

BACKEND="kind=openai_http,target=$URL,request_format=$FORMAT"
[ -n "$API_KEY" ] && BACKEND="$BACKEND,api_key=$API_KEY"
HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} "$GUIDELLM" run \
    --backend "$BACKEND" \
    --profile "kind=concurrent,streams=$STREAMS" \
    --constraint "kind=max_requests,count=$REQUESTS" \
    --tokenizer "kind=huggingface_auto,model=$TOKENIZER" \
    --data "kind=synthetic_text,prompt_tokens=$PROMPT_TOKENS,output_tokens=$OUTPUT_TOKENS" \
    --output "kind=json,path=$OUT" \
    --disable-console-interactive "$@"
