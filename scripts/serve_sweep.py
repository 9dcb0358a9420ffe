"""Aggregate throughput of `adadecode serve` against concurrency, early exit off and on.

    adadecode serve --stages 2 --port 8000 --serve.max_num_seqs=8 &
    python scripts/serve_sweep.py --url http://127.0.0.1:8000 --concurrency 1 2 4 8 --early-exit off eager

For each concurrency ``c`` (in the order given) and, within it, each early-exit mode in turn
(the same server, the mode sent per request as the ``early_exit`` extension field, so that
off and on share every other condition of the run), ``c`` clients send ``--requests`` streamed
greedy requests in all (held-out prompts, the same ones for every point, ``--max-tokens`` each)
through the load-test client (launcher/serve/load_test.py). Reported per point: output
tokens/s, its ratio to concurrency 1 in the same mode, and the early-exit mode's ratio to off
at the same concurrency.
A point with a failed request makes the exit status 1.

With ``--repeats R`` the whole sweep runs R times, interleaved, and each point reports the
median of its R throughputs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path

import httpx
from adadecode.launcher.serve import load_test

ROOT = Path(__file__).resolve().parent.parent


def one_point(url: str, prompts, model: str, clients: int, requests: int, max_tokens: int, mode: str,
              timeout: float) -> dict:
    per_client = -(-requests // clients)
    args = argparse.Namespace(url=url, clients=clients, requests=per_client, max_tokens=max_tokens,
                              early_exit=mode, timeout=timeout, max_seconds=timeout * per_client)
    # every point decodes the same prompts: client c takes prompts[c * per_client + i]
    results, duration = asyncio.run(load_test.run(args, prompts, model))
    good = [r for r in results if r.ok]
    return {"concurrency": clients, "early_exit": mode, "requests": len(results), "failed": len(results) - len(good),
            "output_tokens": sum(r.output_tokens for r in good), "duration": duration,
            "output_throughput": sum(r.output_tokens for r in good) / duration}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (loopback only)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--early-exit", nargs="+", default=["off", "eager"], choices=["off", "eager", "deferred"])
    p.add_argument("--requests", type=int, default=16, help="requests per point, split over its clients")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--prompts", default=str(ROOT / "data/prompts/heldout.jsonl"))
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take")
    p.add_argument("--json-out", metavar="FILE")
    args = p.parse_args(argv)
    load_test.check_loopback(args.url)
    if max(args.concurrency) > load_test.MAX_CLIENTS or min(args.concurrency) < 1:
        raise SystemExit(f"serve_sweep: concurrency in 1..{load_test.MAX_CLIENTS}, please")
    from adadecode.runtime.prompts import select_prompts

    prompts = select_prompts(args.prompts, max(args.requests, max(args.concurrency)))
    model = httpx.get(f"{args.url}/v1/models", timeout=10).json()["data"][0]["id"]
    runs: dict[tuple[int, str], list[dict]] = {}
    for rep in range(args.repeats):
        for c in args.concurrency:
            for mode in args.early_exit:
                point = one_point(args.url, prompts, model, c, args.requests, args.max_tokens, mode, args.timeout)
                runs.setdefault((c, mode), []).append(point)
                print(f"[{rep + 1}/{args.repeats}] concurrency {c}, early exit {mode}: "
                      f"{point['output_throughput']:.2f} tok/s ({point['output_tokens']} tokens in "
                      f"{point['duration']:.1f} s, {point['failed']} failed)", file=sys.stderr, flush=True)

    def tps(c: int, mode: str) -> float:
        return statistics.median(r["output_throughput"] for r in runs[(c, mode)])

    base = args.concurrency[0]
    ratios = [m for m in args.early_exit if m != "off"] if "off" in args.early_exit else []
    head = ["concurrency", *(f"{m} {x}" for m in args.early_exit for x in ("tok/s", f"vs c={base}")),
            *(f"{m} / off" for m in ratios)]
    print("| " + " | ".join(head) + " |")
    print("|---" * len(head) + "|")
    for c in args.concurrency:
        cells = [str(c), *(f"{tps(c, m):.2f} | {tps(c, m) / tps(base, m):.2f}x" for m in args.early_exit),
                 *(f"{tps(c, m) / tps(c, 'off'):.2f}x" for m in ratios)]
        print("| " + " | ".join(cells) + " |")
    failed = sum(r["failed"] for rs in runs.values() for r in rs)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps([r for rs in runs.values() for r in rs], indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
