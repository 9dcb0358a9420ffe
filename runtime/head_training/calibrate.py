"""Calibration: how often each head is confident, and how often it is then right (agrees with
the final layer's greedy token), on prompts it never trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .collect import Split

THRESHOLD_SWEEP = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99)


def head_outcomes(heads, split: Split, chunk: int = 4096) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per head layer: (confidence [N], agrees with the final layer [N]) on ``split``, on the host.

    ``heads``: an ``ExitHeads`` on ``split``'s device; the heads run there, chunk by chunk, and
    each head's results come to the host once, at the end.
    """
    outcomes = {}
    for l in heads.available_layers:
        confs, agrees = [], []
        for a in range(0, split.tokens, chunk):
            ids, conf = heads.predict_batch(l, split.hidden[l][a : a + chunk])
            confs.append(conf)
            agrees.append(ids == split.targets[a : a + chunk])
        outcomes[l] = (torch.cat(confs).cpu(), torch.cat(agrees).cpu())
    return outcomes


def calibration_table(outcomes, split: Split, sweep: Sequence[float] = THRESHOLD_SWEEP) -> dict:
    """Exit rate and precision (top-1 agreement of the exits with the final layer) per threshold."""
    heads = {}
    for l, (conf, agree) in outcomes.items():
        rows = []
        for t in sweep:
            exits = conf > t
            n = int(exits.sum())
            rows.append({
                "threshold": t,
                "exit_rate": round(n / len(conf), 4),
                "precision": round(float(agree[exits].float().mean()), 4) if n else None,
            })
        heads[str(l)] = {"top1_agreement": round(float(agree.float().mean()), 4), "sweep": rows}
    return {"split": split.name, "file": split.file, "prompts": split.prompts, "tokens": split.tokens, "heads": heads}


def outcome_tensors(outcomes, lookup=None) -> dict[str, torch.Tensor]:
    """``head_outcomes`` as the tensors of ``outcomes.safetensors``: per head, each token's
    confidence (fp16: thresholds are two-digit) and whether the head agreed with the final layer;
    with ``lookup`` (``context_lookup.lookup_outcomes`` of the same tokens), the context lookup's
    match length before each token and whether its guess was the token."""
    tensors = {}
    for l, (conf, agree) in outcomes.items():
        tensors[f"confidence.{l}"] = conf.to(torch.float16)
        tensors[f"agrees.{l}"] = agree.to(torch.uint8)
    if lookup is not None:
        tensors["lookup.match"] = torch.tensor(lookup[0], dtype=torch.uint8)
        tensors["lookup.agrees"] = torch.tensor(lookup[1], dtype=torch.uint8)
    return tensors
