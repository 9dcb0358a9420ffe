"""What tracing off costs: this tree (hooks in, recorder off) against the tree before the hooks.

The trace hooks (runtime/trace.py) put an ``is None`` check on every compute call, head
evaluation, LM-head call and hand-over. This times the same decode in both trees, one
process per round, the two trees alternating round by round (so drift hits both), pinned to
one core with one thread, and checks that both decode the same tokens. The baseline tree is
a git worktree of the commit before the hooks (8b6f205^), put first on PYTHONPATH:

    git worktree add /tmp/pre-trace 8b6f205^
    mkdir -p /tmp/pre-pp/adadecode && ln -s /tmp/pre-trace/runtime /tmp/pre-trace/launcher /tmp/pre-pp/adadecode/
    python scripts/bench_trace_off.py --baseline /tmp/pre-pp --rounds 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = """
import json, sys, time, torch
torch.set_num_threads(1)
from adadecode.runtime import Engine
from adadecode.runtime.prompts import select_prompts
import adadecode.runtime.stage as stage_module
n, new, mode, prompts = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
engine = Engine.load("bundled:smollm2-135m-instruct")
encoded = [engine.encode(p, chat=isinstance(p, list)) for p in select_prompts(prompts, n)]
engine.generate(encoded[0], max_new_tokens=8, early_exit=mode)
tokens, seconds, out = 0, 0.0, []
for ids in encoded:
    t0 = time.perf_counter()
    res = engine.generate(ids, max_new_tokens=new, early_exit=mode)
    seconds += time.perf_counter() - t0
    tokens += len(res.tokens)
    out.append(res.tokens)
print(json.dumps({"tokens": tokens, "seconds": seconds, "out": out, "stage": stage_module.__file__}))
"""


def run(pythonpath: str | None, a) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    cmd = ["taskset", "-c", a.core, sys.executable, "-c", WORKER, str(a.num_prompts), str(a.max_new_tokens),
           a.early_exit, a.prompts]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, help="PYTHONPATH entry holding the tree before the hooks")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--num-prompts", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--early-exit", default="deferred", choices=["off", "eager", "deferred"])
    p.add_argument("--prompts", default="data/prompts/heldout.jsonl")
    p.add_argument("--core", default="0")
    a = p.parse_args()
    ratios, rates = [], {"hooks": [], "before": []}
    for r in range(a.rounds):
        order = [("hooks", None), ("before", a.baseline)]
        if r % 2:
            order.reverse()
        got = {name: run(path, a) for name, path in order}
        if got["hooks"]["out"] != got["before"]["out"]:
            raise SystemExit("the two trees decoded different tokens")
        if got["hooks"]["stage"] == got["before"]["stage"]:
            raise SystemExit(f"both runs imported {got['hooks']['stage']}: check --baseline")
        for name in rates:
            rates[name].append(got[name]["tokens"] / got[name]["seconds"])
        ratios.append(rates["hooks"][-1] / rates["before"][-1])
        print(f"round {r}: hooks {rates['hooks'][-1]:.2f} tokens/s, before {rates['before'][-1]:.2f}, "
              f"ratio {ratios[-1]:.3f}", file=sys.stderr)
    print(f"tracing off vs before the hooks: median ratio {statistics.median(ratios):.3f} "
          f"(rounds {', '.join(f'{x:.3f}' for x in ratios)}); tokens identical in every round")


if __name__ == "__main__":
    main()
