"""`adadecode bench`: tokens/s of this runtime against transformers' `generate`.

Both run greedy, batch 1, in this process with the same torch threads, on the
same prompts, interleaved prompt by prompt so that drift in the machine's speed
hits both alike. Tokens/s is generated tokens (prompt excluded) over the wall
time of the whole call, prefill included, for both. The runtime's tokens are
compared with `generate`'s, so a speedup never hides a parity break.

    taskset -c 0,1 adadecode bench --pipeline.threads=2 --num-prompts 8
"""

from __future__ import annotations

import json
import time

import torch

from .cli import build_engine
from .config import RunConfig


def select_prompts(path: str, n: int) -> list:
    """``n`` prompts from a JSONL prompt file, taken round-robin across its categories."""
    import json
    from collections import defaultdict

    by_cat = defaultdict(list)
    for line in open(path, encoding="utf-8"):
        if line.strip():
            item = json.loads(line)
            by_cat[item.get("category", "")].append(item.get("messages") or item["prompt"])
    picked, queues = [], [list(v) for v in by_cat.values()]
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return picked


def first_divergence(ours: list[int], ref: list[int]) -> int | None:
    """Index of the first differing token (or length mismatch), ``None`` when identical."""
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            return i
    return None if len(ours) == len(ref) else min(len(ours), len(ref))


def hf_generate(model, ids: list[int], max_new_tokens: int, eos: list[int]) -> tuple[list[int], float]:
    """transformers' greedy ``generate``: (new token ids, wall seconds)."""
    x = torch.tensor([ids])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos[0],
        )
    return out[0, len(ids) :].tolist(), time.perf_counter() - t0


def run_bench(args, cfg: RunConfig) -> int:
    from transformers import AutoModelForCausalLM

    d = cfg.decoding
    prompts = select_prompts(args.prompts, args.num_prompts)
    engine = build_engine(cfg)
    hf = AutoModelForCausalLM.from_pretrained(str(engine.resolved.path), dtype=engine.stages[0].model.dtype).eval()
    eos = sorted(engine.eos_token_ids)
    encoded = [engine.encode(p, d.chat) for p in prompts]

    for ids in encoded[: args.warmup]:
        hf_generate(hf, ids, 8, eos)
        engine.generate(ids, max_new_tokens=8)

    totals = {"hf": [0, 0.0], "adadecode": [0, 0.0]}
    matches = 0
    busy = [0.0] * len(engine.stages)
    for ids in encoded:
        ref, t_hf = hf_generate(hf, ids, d.max_new_tokens, eos)
        res = engine.generate(ids, max_new_tokens=d.max_new_tokens)
        totals["hf"][0] += len(ref)
        totals["hf"][1] += t_hf
        totals["adadecode"][0] += len(res.tokens)
        totals["adadecode"][1] += res.stats["elapsed_s"]
        busy = [b + f * res.stats["elapsed_s"] for b, f in zip(busy, res.stats["stage_busy_fraction"])]
        matches += res.tokens == ref

    hf_tps = totals["hf"][0] / totals["hf"][1]
    ours_tps = totals["adadecode"][0] / totals["adadecode"][1]
    summary = {
        "model": engine.resolved.origin,
        "prompts": len(encoded),
        "max_new_tokens": d.max_new_tokens,
        "threads": torch.get_num_threads(),
        "stages": engine.layer_ranges,
        "hf_generate_tokens_per_s": round(hf_tps, 2),
        "adadecode_tokens_per_s": round(ours_tps, 2),
        "ratio": round(ours_tps / hf_tps, 3),
        "token_identical_prompts": f"{matches}/{len(encoded)}",
        "stage_busy_fraction": [round(b / totals["adadecode"][1], 3) for b in busy],
    }
    if args.json:
        print(json.dumps(summary))
    else:
        for k, v in summary.items():
            print(f"{k:>26}: {v}")
    return 0 if matches == len(encoded) else 1
