"""The simulator against the machine, live: trace `adadecode bench` on 1..N ranks, fit, predict.

For each rank count it runs ``adadecode bench --stages N --modes off,eager,deferred --trace``
with the heads' manifest defaults (the modes interleaved per prompt, one thread per rank,
pinned), then ``adadecode simulate --trace``, which fits the simulator's costs on that trace
(runtime/sim/fit.py) and simulates every mode with each mode's own exit statistics; it
prints measured and predicted tokens/s of every rank count in one table. ``--keep DIR`` keeps the
traces (``DIR/ranks-N/trace.json``); tests/data holds a gzipped set recorded this way.

    python scripts/bench_simulate.py --ranks 1 2 3 --num-prompts 4 --max-new-tokens 48 --keep /tmp/sim-traces
    python scripts/bench_simulate.py --ranks 1 2 --compile on --keep /tmp/sim-traces-compiled
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--prompts", default="data/prompts/heldout.jsonl")
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--config", default="configs/smollm2-135m.yaml")
    p.add_argument("--keep", help="keep the traces here")
    p.add_argument("--compile", default="off", choices=["on", "off"],
                   help="pipeline.compile: on fits the compiled layer loop's costs (each chunk size compiles in "
                        "the warm-up, untimed)")
    a = p.parse_args()
    root = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="adadecode-sim-"))
    rows = []
    for n in a.ranks:
        out = root / f"ranks-{n}"
        cmd = ["adadecode", "bench", "--config", a.config, "--stages", str(n), "--prompts", a.prompts,
               "--num-prompts", str(a.num_prompts), "--max-new-tokens", str(a.max_new_tokens),
               "--modes", "off,eager,deferred", "--trace", str(out), "--json",
               # the manifest's heads in every setting: exits to calibrate on; no context lookup, whose
               # guesses the simulator replays only from a heads directory's outcomes, not from a trace
               "--decoding.auto_heads=false", "--decoding.lookup=0", f"--pipeline.compile={a.compile}"]
        if n == 1:  # one rank: pin it to one core and one thread, as the multi-rank runs pin each rank
            cmd = ["taskset", "-c", "0", *cmd, "--pipeline.threads=1"]
        print("$", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        fit = ["adadecode", "simulate", "--trace", str(out / "trace.json"), "--json"]
        print("$", " ".join(fit), file=sys.stderr)
        fitted = json.loads(subprocess.run(fit, check=True, stdout=subprocess.PIPE, text=True).stdout)
        for mode, r in fitted["calibration"].items():
            rows.append({"ranks": n, "mode": mode, **{k: r[k] for k in ("measured_tokens_per_s",
                                                                         "predicted_tokens_per_s", "error")}})
        print(json.dumps({"ranks": n, "costs": fitted["costs"]}), file=sys.stderr)
    print("| ranks | mode | measured (tokens/s) | predicted (tokens/s) | error |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ranks']} | {r['mode']} | {r['measured_tokens_per_s']:.2f} | {r['predicted_tokens_per_s']:.2f} "
              f"| {100 * r['error']:+.1f}% |")
    worst = max(abs(r["error"]) for r in rows)
    print(f"\nlargest error: {100 * worst:.1f}% (traces in {root})")


if __name__ == "__main__":
    main()
