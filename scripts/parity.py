"""Token parity of the runtime against transformers' greedy `generate`, on the bundled model.

For each stage count and early-exit mode, every prompt's tokens are compared with
`generate(do_sample=False)`'s. `off` and `eager` must be identical; `deferred`
(batched backfill changes floating-point reduction order) reports its match rate.
Every divergence is printed with its position, both tokens and the reference's
logit gap between them there.

    python scripts/parity.py --num-prompts 18 --max-new-tokens 128 --stages 1 2 3
    python scripts/parity.py --num-prompts 32 --max-new-tokens 256 --stages 1 --early-exit eager deferred --chat
"""

import argparse
import json
import sys

import torch
from adadecode.launcher.bench import first_divergence, hf_generate
from adadecode.runtime.engine import Engine
from adadecode.runtime.prompts import select_prompts
from transformers import AutoModelForCausalLM


def logit_gap(hf, ids: list[int], ref: list[int], ours: list[int], at: int) -> float:
    """The reference's logit of its own token minus ours, at the first divergence."""
    with torch.inference_mode():
        logits = hf(torch.tensor([ids + ref[:at]])).logits[0, -1]
    return float(logits[ref[at]] - logits[ours[at]]) if at < min(len(ref), len(ours)) else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    ap.add_argument("--prompts", default="data/prompts/heldout.jsonl")
    ap.add_argument("--num-prompts", type=int, default=18)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--early-exit", nargs="+", default=["off"], choices=["off", "eager", "deferred"])
    ap.add_argument("--heads", default="auto", help="exit heads directory (auto: the shipped ones)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="ours and the reference generate both load the weights in this dtype")
    ap.add_argument("--chat", action="store_true", help="chat template for plain prompts too (longer answers)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    prompts = select_prompts(args.prompts, args.num_prompts)
    heads = args.heads if set(args.early_exit) - {"off"} else None
    engines = {p: Engine.load(args.model, stages=p, heads=heads, device="cpu", dtype=args.dtype) for p in args.stages}
    first = engines[args.stages[0]]
    hf = AutoModelForCausalLM.from_pretrained(str(first.resolved.path), dtype=getattr(torch, args.dtype)).eval()
    eos = sorted(first.eos_token_ids)
    runs = [(p, mode) for p in args.stages for mode in args.early_exit]
    matches = {run: 0 for run in runs}
    total = 0
    for i, prompt in enumerate(prompts):
        ids = first.encode(prompt, chat=args.chat or isinstance(prompt, list))
        ref, _ = hf_generate(hf, ids, args.max_new_tokens, eos)
        row = {"prompt": i, "prompt_tokens": len(ids), "generated": len(ref)}
        total += len(ref)
        for p, mode in runs:
            ours = engines[p].generate(ids, max_new_tokens=args.max_new_tokens, early_exit=mode).tokens
            at = first_divergence(ours, ref)
            key = f"stages={p},{mode}"
            if at is None:
                row[key] = "identical"
                matches[p, mode] += 1
            else:
                row[key] = {
                    "diverges_at": at, "ours": ours[at : at + 1], "reference": ref[at : at + 1],
                    "logit_gap": round(logit_gap(hf, ids, ref, ours, at), 4),
                }
        print(json.dumps(row), flush=True)
    exact_ok = True
    for (p, mode), m in matches.items():
        print(f"parity stages={p} early_exit={mode}: {m}/{len(prompts)} prompts token-identical "
              f"(up to {args.max_new_tokens} new tokens; {total} reference tokens in all)")
        exact_ok &= mode == "deferred" or m == len(prompts)
    return 0 if exact_ok else 1


if __name__ == "__main__":
    sys.exit(main())
