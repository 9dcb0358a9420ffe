r"""Token parity of the runtime against transformers' greedy `generate`, on the bundled model.

For each stage count and early-exit mode, every prompt's tokens are compared with
`generate(do_sample=False)`'s. `off` and `eager` must be identical; `deferred`
(batched backfill changes floating-point reduction order) reports its match rate.
Every divergence is printed with its position, both tokens and the reference's
logit gap between them there.

    python scripts/parity.py --num-prompts 18 --max-new-tokens 128 --stages 1 2 3
    python scripts/parity.py --num-prompts 32 --max-new-tokens 256 --stages 1 --early-exit eager deferred --chat
    python scripts/parity.py --dtype bfloat16 --num-prompts 16 --max-new-tokens 128 --stages 1 2 3 \
        --early-exit off eager
    python scripts/parity.py --dtype bfloat16 --num-prompts 32 --max-new-tokens 256 --stages 1 2 \
        --early-exit off deferred --chat          # --row-invariant off: merged rows share calls
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
        logits = hf(torch.tensor([ids + ref[:at]], device=hf.device)).logits[0, -1].float()
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
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N: ours and the reference both run there")
    ap.add_argument("--compile", default="off", choices=["off", "on"],
                    help="compiled stages round differently from generate: report, do not expect, parity")
    ap.add_argument("--row-invariant", default="auto", choices=["auto", "on", "off"],
                    help="merged rows (deferred chunks) get the bits they get alone (runtime/row_invariant.py)")
    ap.add_argument("--json-out", default="", help="also write the summary as JSON to this file")
    ap.add_argument("--chat", action="store_true", help="chat template for plain prompts too (longer answers)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    prompts = select_prompts(args.prompts, args.num_prompts)
    heads = args.heads if set(args.early_exit) - {"off"} else None
    engines = {
        p: Engine.load(args.model, stages=p, heads=heads, device=args.device, dtype=args.dtype, compile=args.compile,
                       row_invariant=args.row_invariant)
        for p in args.stages
    }
    first = engines[args.stages[0]]
    hf = AutoModelForCausalLM.from_pretrained(str(first.resolved.path), dtype=getattr(torch, args.dtype))
    hf = hf.to(first.stages[0].model.device).eval()
    eos = sorted(first.eos_token_ids)
    runs = [(p, mode) for p in args.stages for mode in args.early_exit]
    matches = {run: 0 for run in runs}
    agreed = {run: 0 for run in runs}  # reference tokens before the first divergence
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
            agreed[p, mode] += len(ref) if at is None else at
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
    summary = []
    for (p, mode), m in matches.items():
        print(f"parity {args.dtype} on {args.device}, compile {args.compile}, stages={p} early_exit={mode}: "
              f"{m}/{len(prompts)} prompts token-identical, {agreed[p, mode]}/{total} reference tokens before "
              f"the first divergence (up to {args.max_new_tokens} new tokens)")
        summary.append({"dtype": args.dtype, "device": args.device, "compile": args.compile, "stages": p,
                        "early_exit": mode, "identical_prompts": m, "prompts": len(prompts),
                        "tokens_before_divergence": agreed[p, mode], "reference_tokens": total})
        exact_ok &= mode == "deferred" or args.compile == "on" or m == len(prompts)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(summary, f)
    return 0 if exact_ok else 1


if __name__ == "__main__":
    sys.exit(main())
