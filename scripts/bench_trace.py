"""What tracing costs: tokens/s with the recorder off and on, same process, interleaved.

Every prompt is generated twice per round, tracing off then on (the order alternates each
round, so drift in the machine's speed hits both alike), on stages in this process; the
tokens must be identical. Off is the code path every run takes: one ``is None`` check per
compute call and head evaluation (runtime/trace.py).

    taskset -c 0,1 python scripts/bench_trace.py --threads 2 --early-exit deferred --stages 2
    python scripts/bench_trace.py --model ~/models/Qwen2.5-0.5B-Instruct --num-prompts 4 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from adadecode.runtime import Engine
from adadecode.runtime.prompts import select_prompts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bundled:smollm2-135m-instruct")
    p.add_argument("--prompts", default="data/prompts/heldout.jsonl")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--stages", type=int, default=1)
    p.add_argument("--early-exit", default="deferred", choices=["off", "eager", "deferred"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    engine = Engine.load(a.model, stages=a.stages)
    encoded = [engine.encode(x, chat=isinstance(x, list)) for x in select_prompts(a.prompts, a.num_prompts)]
    engine.generate(encoded[0], max_new_tokens=8, early_exit=a.early_exit)  # warm-up
    tokens = {False: 0, True: 0}
    seconds = {False: 0.0, True: 0.0}
    events = identical = 0
    for r in range(a.rounds):
        for ids in encoded:
            outs = {}
            for on in ((False, True) if r % 2 == 0 else (True, False)):
                recorder = engine.runner.set_trace(on)
                t0 = time.perf_counter()
                res = engine.generate(ids, max_new_tokens=a.max_new_tokens, early_exit=a.early_exit)
                seconds[on] += time.perf_counter() - t0
                tokens[on] += len(res.tokens)
                outs[on] = res.tokens
                events += len(recorder.events) if recorder is not None else 0
            engine.runner.set_trace(False)
            identical += outs[False] == outs[True]
    off, on = tokens[False] / seconds[False], tokens[True] / seconds[True]
    print(json.dumps({
        "model": a.model, "stages": engine.layer_ranges, "early_exit": a.early_exit, "threads": torch.get_num_threads(),
        "generations_per_side": a.rounds * len(encoded), "tokens_per_s_trace_off": round(off, 2),
        "tokens_per_s_trace_on": round(on, 2), "on_vs_off": round(on / off, 4),
        "events_per_token": round(events / max(tokens[True], 1), 2),
        "token_identical": f"{identical}/{a.rounds * len(encoded)}",
    }))


if __name__ == "__main__":
    main()
