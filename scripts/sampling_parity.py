"""Seeded sampling parity on the bundled model: early exit off, eager and deferred, in-process
stages and ranks, all against plain seeded sampling (1 stage, early exit off).

The output of seeded sampling is a function of (prompt, seed): every run must give the
reference's tokens; `deferred` (merged chunks change the floating-point reduction order)
reports its match rate, as for greedy (scripts/parity.py). Every divergence is printed.

    python scripts/sampling_parity.py --num-prompts 16 --max-new-tokens 128 --seeds 0 1 2 3 \\
        --stages 1 2 --ranks 2 --threads 1

Runs can be split over processes (one core each) and merged:

    taskset -c 0 python scripts/sampling_parity.py --stages 1 --ranks --tokens-out s1.json ...
    taskset -c 1 python scripts/sampling_parity.py --stages 2 --ranks --tokens-out s2.json ...
    python scripts/sampling_parity.py --stages --ranks 2 --tokens-out r2.json ...
    python scripts/sampling_parity.py --merge s1.json s2.json r2.json

`--ranks 2` runs `adadecode generate --stages 2` (2 gloo ranks, one thread each, pinned one per
core) once per seed and mode, with the same prompts and flags.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from adadecode.launcher.bench import first_divergence

MODES = ("off", "eager", "deferred")


def in_process(args, prompts) -> dict[str, list[list[int]]]:
    """``{"stages=P,MODE,seed=S": [tokens per prompt]}`` for each in-process stage count."""
    import torch
    from adadecode.runtime.engine import Engine
    from adadecode.runtime.sampling import SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    out = {}
    for p in args.stages:
        engine = Engine.load(args.model, stages=p)
        for seed in args.seeds:
            params = SamplingParams(args.temperature, top_p=args.top_p, seed=seed)
            for mode in MODES:
                key = f"stages={p},{mode},seed={seed}"
                out[key] = []
                for prompt in prompts:
                    ids = engine.encode(prompt, chat=isinstance(prompt, list))
                    out[key].append(engine.generate(ids, max_new_tokens=args.max_new_tokens, early_exit=mode,
                                                    sampling=params).tokens)
                print(f"{key}: done", file=sys.stderr, flush=True)
    return out


def on_ranks(args, prompts) -> dict[str, list[list[int]]]:
    """The same through `adadecode generate --stages N` (N gloo ranks), one call per seed and mode."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "prompts.jsonl"
        file.write_text("".join(json.dumps({"messages": p} if isinstance(p, list) else {"prompt": p}) + "\n"
                                for p in prompts))
        for n in args.ranks:
            for seed in args.seeds:
                for mode in MODES:
                    cmd = [sys.executable, "-m", "adadecode.launcher.cli", "generate", "--stages", str(n),
                           "--prompts", str(file), "--json", "--max-new-tokens", str(args.max_new_tokens),
                           "--temperature", str(args.temperature), "--top-p", str(args.top_p),
                           "--seed", str(seed), "--early-exit", mode, "--model", args.model]
                    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                    if proc.returncode != 0:
                        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
                    key = f"ranks={n},{mode},seed={seed}"
                    out[key] = [json.loads(line)["tokens"] for line in proc.stdout.splitlines()]
                    print(f"{key}: done", file=sys.stderr, flush=True)
    return out


def report(tokens: dict[str, list[list[int]]], seeds: list[int]) -> tuple[list[dict], bool]:
    """Every run against ``stages=1,off`` of its seed; rows per (where, mode) over all seeds."""
    rows: dict[str, dict] = {}
    exact_ok = True
    for key, runs in sorted(tokens.items()):
        where, mode, seed = key.split(",")
        ref_key = f"stages=1,off,{seed}"
        if ref_key not in tokens:
            raise SystemExit(f"no reference {ref_key}: run --stages 1 too (or --merge its output)")
        row = rows.setdefault(f"{where},{mode}", {"run": f"{where},{mode}", "identical": 0, "prompts": 0,
                                                  "tokens_before_divergence": 0, "reference_tokens": 0})
        for i, (ours, ref) in enumerate(zip(runs, tokens[ref_key])):
            at = first_divergence(ours, ref)
            row["prompts"] += 1
            row["reference_tokens"] += len(ref)
            row["tokens_before_divergence"] += len(ref) if at is None else at
            row["identical"] += at is None
            if at is not None:
                print(json.dumps({"run": key, "prompt": i, "diverges_at": at, "ours": ours[at:at + 1],
                                  "reference": ref[at:at + 1]}))
                exact_ok &= mode == "deferred"
    return list(rows.values()), exact_ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    ap.add_argument("--prompts", default="data/prompts/heldout.jsonl")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--stages", type=int, nargs="*", default=[1, 2], help="in-process stage counts")
    ap.add_argument("--ranks", type=int, nargs="*", default=[], help="rank counts, through `adadecode generate`")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the in-process runs")
    ap.add_argument("--tokens-out", default="", help="write every run's tokens to this JSON file")
    ap.add_argument("--merge", nargs="+", default=[], help="report on --tokens-out files instead of running")
    ap.add_argument("--json-out", default="", help="write the summary rows to this JSON file")
    args = ap.parse_args()

    if args.merge:
        tokens = {}
        for f in args.merge:
            tokens.update(json.loads(Path(f).read_text()))
        seeds = sorted({int(k.split("seed=")[1]) for k in tokens})
    else:
        from adadecode.runtime.prompts import select_prompts

        prompts = select_prompts(args.prompts, args.num_prompts)
        tokens = {**in_process(args, prompts), **on_ranks(args, prompts)}
        seeds = args.seeds
        if args.tokens_out:
            Path(args.tokens_out).write_text(json.dumps(tokens))
        if not any(k.startswith("stages=1,off,") for k in tokens):
            return 0  # a part of a split run: --merge reports
    rows, exact_ok = report(tokens, seeds)
    for row in rows:
        print(f"seeded sampling, seeds {seeds}, {row['run']}: {row['identical']}/{row['prompts']} (prompt, seed) "
              f"runs token-identical to plain seeded sampling, {row['tokens_before_divergence']}/"
              f"{row['reference_tokens']} reference tokens before the first divergence")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows))
    return 0 if exact_ok else 1


if __name__ == "__main__":
    sys.exit(main())
