"""Token parity of the runtime against transformers' greedy `generate`, on the bundled model.

For each stage count, every prompt's tokens must equal `generate(do_sample=False)`'s;
any divergence is printed with its position and both tokens.

    python scripts/parity.py --num-prompts 18 --max-new-tokens 128 --stages 1 2 3
"""

import argparse
import json
import sys

import torch
from transformers import AutoModelForCausalLM

from launcher.bench import first_divergence, hf_generate, select_prompts
from runtime.engine import Engine


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    ap.add_argument("--prompts", default="data/prompts/heldout.jsonl")
    ap.add_argument("--num-prompts", type=int, default=18)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    prompts = select_prompts(args.prompts, args.num_prompts)
    engines = {p: Engine.load(args.model, stages=p) for p in args.stages}
    first = engines[args.stages[0]]
    hf = AutoModelForCausalLM.from_pretrained(str(first.resolved.path), dtype=torch.float32).eval()
    eos = sorted(first.eos_token_ids)
    failures = 0
    for i, prompt in enumerate(prompts):
        ids = first.encode(prompt, chat=isinstance(prompt, list))
        ref, _ = hf_generate(hf, ids, args.max_new_tokens, eos)
        row = {"prompt": i, "prompt_tokens": len(ids), "generated": len(ref)}
        for p, engine in engines.items():
            ours = engine.generate(ids, max_new_tokens=args.max_new_tokens).tokens
            at = first_divergence(ours, ref)
            row[f"stages={p}"] = "identical" if at is None else f"diverges at {at}: {ours[at:at+1]} vs {ref[at:at+1]}"
            failures += at is not None
        print(json.dumps(row), flush=True)
    total = len(prompts) * len(engines)
    print(f"parity: {total - failures}/{total} prompt x stage runs token-identical "
          f"({len(prompts)} prompts x {args.max_new_tokens} new tokens, stages {args.stages})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
