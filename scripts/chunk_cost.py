"""What a merged chunk costs: one stage's layers and LM head on 1, 2 and 3 rows, eager and compiled.

A `deferred` backfill runs an early token's remaining layers merged with the next token's
pass, as one chunk of 2 (or, with more tokens in flight, 3) rows. It pays only where a
chunk of k rows costs well under k single rows. This times exactly the calls a stage makes
(`StageModel.run_layers` over every layer on k decode rows, `parts` 1 each, then
`greedy_tokens`) at a fixed context length, the cache truncated back after each call as a
rollback would, with the compiled step (`pipeline.compile=on`, runtime/compiled_step.py) and
without, under `pipeline.row_invariant` (`--row-invariant`; off: the rows share every call).

    taskset -c 0 python scripts/chunk_cost.py --threads 1 --context 128 --repeats 30
    taskset -c 0 python scripts/chunk_cost.py --compile on --gemm-backends CPP,ATEN   # autotune's pick
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from adadecode.runtime.compiled_step import CPU_INDUCTOR
from adadecode.runtime.engine import Engine


def time_calls(fn, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(samples)


def measure(compile_setting: str, rows: list[int], context: int, repeats: int, dtype: str,
            row_invariant: str = "auto") -> dict[int, dict]:
    engine = Engine.load(stages=1, device="cpu", dtype=dtype, heads=None, compile=compile_setting,
                         max_inflight=max(rows) - 1, max_seq_len=context + max(rows) + 8, row_invariant=row_invariant)
    model = engine.stages[0].model
    prompt = torch.randint(0, engine.args.vocab_size, (context,)).tolist()
    model.run_layers(model.embed(prompt), 0, model.start, model.end)
    out = {}
    for k in rows:
        hidden = model.embed(prompt[:k])

        def layers(hidden=hidden, parts=(1,) * k):
            model.run_layers(hidden, context, model.start, model.end, parts=parts)
            model.truncate(0, context)

        out[k] = {"layers_ms": time_calls(layers, repeats),
                  "head_ms": time_calls(lambda hidden=hidden: model.greedy_tokens(hidden), repeats)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--context", type=int, default=128, help="positions already in the cache")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--compile", nargs="+", default=["off", "on"])
    p.add_argument("--row-invariant", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--gemm-backends", default=CPU_INDUCTOR["max_autotune_gemm_backends"],
                   help="inductor's GEMM backends on compiled stages (CPP,ATEN: let autotuning pick ATen's too)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    CPU_INDUCTOR["max_autotune_gemm_backends"] = a.gemm_backends
    results = {c: measure(c, a.rows, a.context, a.repeats, a.dtype, a.row_invariant) for c in a.compile}
    if a.json:
        print(json.dumps(results, indent=1))
        return
    print("| path | rows | layers (ms) | LM head (ms) | step (ms) | x one row | per row |")
    print("|---|---|---|---|---|---|---|")
    for c, by_rows in results.items():
        one = by_rows[a.rows[0]]["layers_ms"] + by_rows[a.rows[0]]["head_ms"]
        for k, r in by_rows.items():
            step = r["layers_ms"] + r["head_ms"]
            print(f"| {'compiled' if c == 'on' else 'eager'} | {k} | {r['layers_ms']:.2f} | {r['head_ms']:.2f} | "
                  f"{step:.2f} | {step / one:.2f} | {step / one / k:.2f} |")


if __name__ == "__main__":
    main()
