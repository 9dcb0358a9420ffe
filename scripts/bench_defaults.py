"""Do the shipped defaults ever lose? `adadecode bench` per setting, early exit against off.

For each setting (stages x threads) it runs, on a prompt mix of code, chat and plain text that
nothing was tuned on (data/prompts/mix.jsonl), one `adadecode bench` per early-exit mode with
the defaults (heads chosen for the setting, runtime/sim/heads.py), and one with the heads'
manifest defaults (``--decoding.auto_heads=false``) for comparison; each run interleaves off
and the mode per prompt. One thread per rank unless the setting says otherwise, pinned.

    python scripts/bench_defaults.py --settings 1x1 2x1 --no-manifest      # compiled (bench's default)
    python scripts/bench_defaults.py --settings 1x1 1x2 2x1 3x1 --max-new-tokens 48 --flag=--pipeline.compile=off
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def bench(stages: int, threads: int, extra: list[str], a) -> dict:
    cmd = ["adadecode", "bench", "--stages", str(stages), "--prompts", a.prompts, "--num-prompts", str(a.num_prompts),
           "--max-new-tokens", str(a.max_new_tokens), "--json", f"--pipeline.threads={threads}", *a.flag, *extra]
    if stages == 1:
        cmd = ["taskset", "-c", ",".join(str(i) for i in range(threads)), *cmd]
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if out.returncode not in (0, 1):  # 1: a deferred run differed from greedy somewhere (reported, not fatal)
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])["results"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", nargs="+", default=["1x1", "1x2", "2x1", "3x1"], help="STAGESxTHREADS")
    p.add_argument("--prompts", default="data/prompts/mix.jsonl")
    p.add_argument("--num-prompts", type=int, default=12)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--flag", action="append", default=[],
                   help="a flag for every bench run, e.g. --flag=--pipeline.compile=on")
    p.add_argument("--no-manifest", action="store_true", help="skip the runs with the manifest's heads")
    a = p.parse_args()
    rows = []
    for setting in a.settings:
        stages, threads = (int(x) for x in setting.split("x"))
        row = {"stages": stages, "threads": threads}
        for mode in ("eager", "deferred"):
            r = bench(stages, threads, ["--early-exit", mode, "--modes", f"off,{mode}"], a)
            row[f"{mode} (defaults)"] = r[mode]["vs_off"]
            row[f"{mode} identical"] = r[mode]["token_identical_prompts"]
            row["off tokens/s"] = r["off"]["tokens_per_s"]
        if not a.no_manifest:
            r = bench(stages, threads, ["--decoding.auto_heads=false", "--modes", "off,eager,deferred"], a)
            row["eager (manifest heads)"] = r["eager"]["vs_off"]
            row["deferred (manifest heads)"] = r["deferred"]["vs_off"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
