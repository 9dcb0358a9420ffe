"""Speculative sampling on the bundled model: the empirical next-token distribution at a handful
of positions against the final layer's (processed) distribution p.

At each position (held-out prompts: the first `--positions` positions of each prompt's greedy
continuation where p keeps at least `--min-support` tokens, so that there is a distribution to
test; where top-p leaves one token every sampler agrees) the exit head at each `--head-layers`
layer proposes for every seed (threshold 0: it always proposes, so every draw goes through the
min(1, p/q) test or the residual), and the final layer accepts or resamples. The draws are
made with the runtime's own functions on the hidden states of one prefill
(`ExitHeads.propose`, `sampling.speculative_token`: what the heads and the last stage call);
`--engine-draws` of them are repeated through `Engine.generate` on the whole pipeline, which
must give the same tokens.

Reported per position and head layer: the support of p, the acceptance rate, KL(empirical || p)
for speculative draws and, as the baseline of what finite sampling gives, for the same number
of plain seeded draws; total variation to p of both and of the head's own q (what keeping every
proposal would sample); the chi-square p-value of the speculative draws against p.

    taskset -c 0 python scripts/sampling_kl.py --num-prompts 4 --positions 2 --draws 10000 \\
        --head-layers 7 22 --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

import torch
from adadecode.runtime import sampling
from adadecode.runtime.engine import Engine
from adadecode.runtime.prompts import select_prompts
from adadecode.runtime.sampling import SamplingParams


def kl(counts: torch.Tensor, p: torch.Tensor) -> float:
    """KL(empirical || p) in nats; the empirical distribution never leaves p's support."""
    emp = counts.double() / counts.sum()
    seen = emp > 0
    assert bool((p[seen] > 0).all()), "a draw outside p's support"
    return float((emp[seen] * (emp[seen] / p[seen].double()).log()).sum())


def tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a.double() - b.double()).abs().sum())


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    counts, expected = counts.double(), probs.double() * counts.sum()
    keep = expected >= 5
    observed = torch.cat([counts[keep], counts[~keep].sum()[None]])
    expected = torch.cat([expected[keep], expected[~keep].sum()[None]])
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    stat = ((observed - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc(torch.tensor((len(expected) - 1) / 2, dtype=torch.float64), stat / 2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="data/prompts/heldout.jsonl")
    ap.add_argument("--num-prompts", type=int, default=4)
    ap.add_argument("--positions", type=int, default=2, help="positions per prompt")
    ap.add_argument("--min-support", type=int, default=4, help="tokens p must keep at a tested position")
    ap.add_argument("--horizon", type=int, default=32, help="greedy tokens searched for positions")
    ap.add_argument("--head-layers", type=int, nargs="+", default=[7, 22])
    ap.add_argument("--draws", type=int, default=10000)
    ap.add_argument("--engine-draws", type=int, default=50, help="of them, repeated through Engine.generate")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json-out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    engine = Engine.load("bundled:smollm2-135m-instruct", stages=1)
    stage, model = engine.stages[0], engine.stages[0].model
    shipped = stage.heads
    params = SamplingParams(args.temperature, top_p=args.top_p, mode="speculative")
    rows, mismatches = [], 0
    for n, prompt in enumerate(select_prompts(args.prompts, args.num_prompts)):
        ids = engine.encode(prompt, chat=isinstance(prompt, list))
        greedy = engine.generate(ids, max_new_tokens=args.horizon).tokens
        model.reset(0)
        with torch.inference_mode():  # row j predicts position j + 1
            following = model.logits(model.run_layers(model.embed(ids + greedy), 0, 0, model.end, 0))
        offsets = [j + 1 - len(ids) for j in range(len(ids) - 1, len(ids) + len(greedy) - 1)
                   if int((sampling.process_logits(following[j], params) > -math.inf).sum()) >= args.min_support]
        for offset in offsets[: args.positions]:
            prefix = ids + greedy[:offset]
            pos = len(prefix)
            for layer in args.head_layers:
                heads = shipped.select([layer], 0.0)
                model.reset(0)  # one prefill, cut where the pipeline cuts it: [0, layer), [layer, L)
                with torch.inference_mode():
                    h_layer = model.run_layers(model.embed(prefix), 0, 0, layer, 0)
                    h = model.run_layers(h_layer, 0, layer, model.end, 0)
                    logits = model.logits(h[-1:])[0]
                p = sampling.process_logits(logits, params).softmax(-1)
                spec, plain = torch.zeros_like(p), torch.zeros_like(p)
                accepted, q = 0, None
                for seed in range(args.draws):
                    sp = dataclasses.replace(params, seed=seed)
                    _, _, proposal = heads.propose(layer, h_layer[-1], sp, pos)
                    token = sampling.speculative_token(p, proposal, seed, pos)
                    spec[token] += 1
                    accepted += token == proposal.token
                    plain[sampling.sample_token(logits, dataclasses.replace(sp, mode="seeded"), pos)] += 1
                    if q is None:
                        q = torch.zeros_like(p)
                        q[list(proposal.ids)] = torch.tensor(proposal.probs, dtype=q.dtype)
                    if seed < args.engine_draws:  # the same draw through the whole pipeline
                        stage.heads = heads
                        try:
                            res = engine.generate(prefix, max_new_tokens=1, early_exit="eager", sampling=sp)
                        finally:
                            stage.heads = shipped
                        mismatches += res.tokens != [token]
                row = {
                    "prompt": n, "offset": offset, "position": pos, "head_layer": layer, "draws": args.draws,
                    "support_p": int((p > 0).sum()), "acceptance": round(accepted / args.draws, 4),
                    "kl_speculative": round(kl(spec, p), 5), "kl_plain": round(kl(plain, p), 5),
                    "tv_speculative": round(tv(spec / spec.sum(), p), 4),
                    "tv_plain": round(tv(plain / plain.sum(), p), 4),
                    "tv_head_q": round(tv(q, p), 4), "chi2_p_speculative": round(chi_square_p_value(spec, p), 4),
                    "chi2_p_plain": round(chi_square_p_value(plain, p), 4),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("kl_speculative", "kl_plain", "acceptance", "tv_head_q")}
    print(f"{len(rows)} (position, head) pairs, {args.draws} draws each: mean KL(speculative || p) = "
          f"{mean['kl_speculative']:.5f} nats, mean KL(plain || p) = {mean['kl_plain']:.5f} nats (finite sampling), "
          f"mean acceptance {mean['acceptance']:.3f}, mean TV(q, p) {mean['tv_head_q']:.3f}; "
          f"pipeline draws differing from the direct ones: "
          f"{mismatches}/{len(rows) * min(args.engine_draws, args.draws)}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"rows": rows, "mean": mean, "pipeline_mismatches": mismatches}, f)
    min_p = min(min(r["chi2_p_speculative"] for r in rows), 1.0)
    print(f"smallest chi-square p-value of the speculative draws: {min_p:.4g} (over {len(rows)} tests)")
    return 0 if mismatches == 0 and not math.isnan(min_p) else 1


if __name__ == "__main__":
    sys.exit(main())
