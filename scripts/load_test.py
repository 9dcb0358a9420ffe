"""Load test of `adadecode serve`, reporting what `vllm bench serve` reports, under its names.

    adadecode serve --stages 2 --port 8000 &
    python scripts/load_test.py --url http://127.0.0.1:8000 --clients 8 --requests 2 --max-tokens 64 --check-parity

``--clients`` concurrent clients each send ``--requests`` requests back to back: held-out
prompts (data/prompts/heldout.jsonl, taken round-robin over its categories by
``adadecode.runtime.prompts.select_prompts``; a text prompt goes to /v1/completions, a chat
prompt to /v1/chat/completions), greedy, streamed with ``stream_options.include_usage``, each
asking for exactly ``--max-tokens`` (fewer only at EOS, and with ``--ignore-eos`` never fewer:
a steady load). Reported, as `vllm bench serve` does:
request throughput, output and total token throughput, and TTFT / TPOT / ITL / E2EL mean,
median and p99 (TTFT: to the first text chunk; TPOT: per request, (E2EL - TTFT) / (output
tokens - 1); ITL: every gap between text chunks, pooled; E2EL: whole request), plus errors and
what the server's /metrics counted during the run (early tokens, rollbacks, stage busy fraction).

``--check-parity``: afterwards every distinct prompt is sent again alone (one request at a
time, early exit off: plain greedy decoding) and every output of the loaded run, in whatever
``--early-exit`` mode, must equal it: same text, same number of completion
tokens, same finish reason. The API returns no token ids (``logprobs`` is refused), so this
compares text plus token count; two greedy outputs of equal text and equal length that differ
in tokens would need two tokenizations of one string, which greedy decoding of one model does
not produce in practice. For a token-level check of the runtime, see scripts/parity.py.

Bounded: loopback servers only (127.0.0.0/8, ::1, localhost); at most 256 clients and 4096
requests; ``--max-seconds`` ends the run (requests still open are cancelled and counted as
errors); every request has ``--timeout``. Exit status 1 when a request failed or parity did not hold.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import httpx
from adadecode.launcher.serve.load_test import (
    MAX_CLIENTS,
    MAX_REQUESTS,
    alone,
    check_loopback,
    metrics,
    report,
    run,
)

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (loopback only)")
    p.add_argument("--clients", type=int, default=8, help=f"concurrent clients (at most {MAX_CLIENTS})")
    p.add_argument("--requests", type=int, default=2, help="requests per client, back to back")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompts", default=str(ROOT / "data/prompts/heldout.jsonl"))
    p.add_argument("--early-exit", choices=["off", "eager", "deferred"], help="the early_exit extension field "
                   "(default: the server's decoding.early_exit)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="every request runs to --max-tokens (the server's ignore_eos), as vllm bench serve's")
    p.add_argument("--check-parity", action="store_true", help="compare every output with its prompt decoded alone")
    p.add_argument("--max-seconds", type=float, default=900.0, help="end the run after this long")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take")
    p.add_argument("--json-out", metavar="FILE", help="write the summary (vllm bench serve's keys) as JSON")
    args = p.parse_args(argv)
    if not 1 <= args.clients <= MAX_CLIENTS or args.requests < 1 or args.clients * args.requests > MAX_REQUESTS:
        raise SystemExit(f"load_test: 1..{MAX_CLIENTS} clients and at most {MAX_REQUESTS} requests in all, please")
    check_loopback(args.url)
    from adadecode.runtime.prompts import select_prompts

    prompts = select_prompts(args.prompts, args.clients * args.requests)
    try:
        health = httpx.get(f"{args.url}/health", timeout=10)
    except httpx.HTTPError as e:
        raise SystemExit(f"load_test: no server at {args.url}: {e}") from None
    if health.status_code != 200:
        raise SystemExit(f"load_test: {args.url}/health answers {health.status_code}: {health.text}")
    model = httpx.get(f"{args.url}/v1/models", timeout=10).json()["data"][0]["id"]
    print(f"{args.clients} clients x {args.requests} requests, {args.max_tokens} tokens each, "
          f"{len(set(range(len(prompts))))} prompts, model {model}", flush=True)
    before = metrics(args.url)
    results, duration = asyncio.run(run(args, prompts, model))
    summary = report(results, duration, before, metrics(args.url), args)
    status = 0 if summary["failed"] == 0 else 1
    if args.check_parity:
        reference = alone(args, prompts, {r.prompt_index for r in results if r.ok}, model)
        compared = [r for r in results if r.ok]
        differ = [r for r in compared if (r.text, r.output_tokens, r.finish_reason) != reference[r.prompt_index]]
        summary["parity"] = {"compared": len(compared), "identical": len(compared) - len(differ)}
        print(f"parity: {summary['parity']['identical']}/{summary['parity']['compared']} outputs identical to their "
              "prompt decoded alone (text, completion tokens, finish reason)")
        for r in differ[:5]:
            print(f"  prompt {r.prompt_index}: loaded {r.output_tokens} tokens {r.text[-60:]!r} "
                  f"vs alone {reference[r.prompt_index][1]} tokens {reference[r.prompt_index][0][-60:]!r}")
        status = status or (1 if differ else 0)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main())
