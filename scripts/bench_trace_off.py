"""What tracing off costs: this tree (hooks in, recorder off) against a tree without the hooks.

The trace hooks (runtime/trace.py) put an ``is None`` check on every compute call, head
evaluation, LM-head call and hand-over. This times the same decode in both trees, one
process per round, the two trees alternating round by round (so drift hits both), pinned to
one core with one thread, and checks that both decode the same tokens. The baseline is put
first on PYTHONPATH; either ``--strip``: a copy of this tree with every hook's test replaced
by its constant (``if True:``, which Python compiles away), so the two differ in the hooks
only; or a worktree of the commit before the hooks (which also lacks what came after):

    python scripts/bench_trace_off.py --strip --rounds 8
    git worktree add /tmp/pre-trace 8b6f205^
    mkdir -p /tmp/pre-pp/adadecode && ln -s /tmp/pre-trace/runtime /tmp/pre-trace/launcher /tmp/pre-pp/adadecode/
    python scripts/bench_trace_off.py --baseline /tmp/pre-pp --rounds 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

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


HOOKED = ("runtime/stage.py", "runtime/runners/inprocess.py", "runtime/runners/routing.py")


def stripped_tree() -> str:
    """A copy of runtime/ and launcher/ as ``adadecode.*`` with the trace hooks compiled away."""
    root = Path(tempfile.mkdtemp(prefix="adadecode-nohooks-"))
    here = Path(__file__).resolve().parents[1]
    for name in ("runtime", "launcher"):
        shutil.copytree(here / name, root / "adadecode" / name)
    for rel in HOOKED:
        path = root / "adadecode" / rel
        text = path.read_text()
        n = text.count("self.trace is None") + text.count("self.trace is not None")
        if not n:
            raise SystemExit(f"{rel}: no trace hook found to strip")
        path.write_text(text.replace("self.trace is not None", "False").replace("self.trace is None", "True"))
    return str(root)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    base = p.add_mutually_exclusive_group(required=True)
    base.add_argument("--baseline", help="PYTHONPATH entry holding a tree without the hooks")
    base.add_argument("--strip", action="store_true", help="baseline: this tree with the hooks compiled away")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--num-prompts", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--early-exit", default="deferred", choices=["off", "eager", "deferred"])
    p.add_argument("--prompts", default="data/prompts/heldout.jsonl")
    p.add_argument("--core", default="0")
    a = p.parse_args()
    if a.strip:
        a.baseline = stripped_tree()
    ratios, rates = [], {"hooks": [], "baseline": []}
    for r in range(a.rounds):
        order = [("hooks", None), ("baseline", a.baseline)]
        if r % 2:
            order.reverse()
        got = {name: run(path, a) for name, path in order}
        if got["hooks"]["out"] != got["baseline"]["out"]:
            raise SystemExit("the two trees decoded different tokens")
        if got["hooks"]["stage"] == got["baseline"]["stage"]:
            raise SystemExit(f"both runs imported {got['hooks']['stage']}: check --baseline")
        for name, values in rates.items():
            values.append(got[name]["tokens"] / got[name]["seconds"])
        ratios.append(rates["hooks"][-1] / rates["baseline"][-1])
        print(f"round {r}: hooks {rates['hooks'][-1]:.2f} tokens/s, baseline {rates['baseline'][-1]:.2f}, "
              f"ratio {ratios[-1]:.3f}", file=sys.stderr)
    print(f"tracing off vs no hooks: median ratio {statistics.median(ratios):.3f} "
          f"(rounds {', '.join(f'{x:.3f}' for x in ratios)}); tokens identical in every round")


if __name__ == "__main__":
    main()
