"""One call for the decode steps of k sequences against k calls, on one stage: what batching
items of several sequences (serving) saves, and whether it changes any bits.

Loads the model with k cache slots, prefills k held-out prompts, then times a decode step of
all k sequences through every layer and the LM head: k single-sequence calls
(``StageModel.run_layers``, as one sequence at a time would run) against one batched call
(``run_layers_batch``), alternating, on the same positions (each repeat rolls the caches back
by a length move). Reports seconds per step, the speedup, and whether the batched rows are
bit-identical to the single ones.

    taskset -c 0 python scripts/bench_batch.py --threads 1 --batch 1,2,4,8
    taskset -c 0 python scripts/bench_batch.py --threads 1 --dtype bfloat16 --mode fused
    taskset -c 0 python scripts/bench_batch.py --threads 1 --compile on --mode fused

With ``--compile on`` both sides run the compiled step: the single calls its one-row graph, a
fused batch its per-row graphs (a graph for 2, 3 and 4 rows, compiled at load, which takes
minutes on a CPU; a batch of more than 4 rows runs in even pieces, CompiledStep.FUSED_ROWS).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from adadecode.runtime.engine import Engine
from adadecode.runtime.prompts import select_prompts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    ap.add_argument("--batch", default="1,2,4,8")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", default="off", choices=["off", "on"], help="pipeline.compile for both sides")
    ap.add_argument("--mode", default="exact", choices=["exact", "fused"],
                    help="exact: each sequence through each layer's own forward; fused: one matmul for all rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(k) for k in args.batch.split(",")]
    engine = Engine.load(args.model, device="cpu", dtype=args.dtype, heads=None, num_slots=max(sizes),
                         compile=args.compile, batching=args.mode)
    model = engine.stages[0].model
    L = engine.args.num_layers
    prompts = select_prompts("data/prompts/heldout.jsonl", max(sizes))
    ids = [engine.encode(p, chat=isinstance(p, list)) for p in prompts]
    hidden = []
    with torch.inference_mode():
        for slot, prompt in enumerate(ids):
            h = model.run_layers(model.embed(prompt), 0, 0, L, slot)
            token = model.greedy_tokens(h[-1:])[0]
            hidden.append(model.embed([token]))
    rows = []
    for k in sizes:
        chunks = [(hidden[s], len(ids[s]), s) for s in range(k)]
        single = batched = 0.0
        identical = True
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            one = [model.run_layers(h, pos, 0, L, s) for h, pos, s in chunks]
            toks_one = [model.greedy_tokens(o) for o in one]
            single += time.perf_counter() - t0
            for _, pos, s in chunks:
                model.truncate(s, pos)
            t0 = time.perf_counter()
            many = model.run_layers_batch(chunks, 0, L, exact=args.mode == "exact")
            if args.mode == "exact":  # the LM head per sequence too, as the Stage does
                toks_many = [t for o in many for t in model.greedy_tokens(o)]
            else:
                toks_many = model.greedy_tokens(torch.cat(many))
            batched += time.perf_counter() - t0
            for _, pos, s in chunks:
                model.truncate(s, pos)
            identical &= all(torch.equal(a, b) for a, b in zip(one, many)) and sum(toks_one, []) == toks_many
        rows.append({
            "sequences": k, "single_calls_ms": round(1e3 * single / args.repeats, 2),
            "one_batched_call_ms": round(1e3 * batched / args.repeats, 2),
            "speedup": round(single / batched, 3), "bit_identical": identical,
        })
        print(json.dumps(rows[-1]), flush=True)
    summary = {"dtype": args.dtype, "mode": args.mode, "compile": args.compile, "threads": torch.get_num_threads()}
    print(json.dumps({**summary, "results": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
