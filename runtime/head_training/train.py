"""Fitting the heads: each head (linear: ``T_l``, identity at start; mlp: ``T_l`` plus a small
MLP whose output starts at zero, families.MLPHead) on KL(final || head), by Adam with a linear
warmup and a cosine decay to 0, all heads in one loop over the same batches.

The heads train in float32 on the device that holds the collected states, whatever the
base model's dtype: the states and the teacher's logits are cast to float32 per batch (the
stored states stay in the model's dtype, half the memory in bfloat16).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..exit_heads import head_logits
from .collect import Split
from .families import LinearHead, MLPHead


def train(split: Split, layers: Sequence[int], norm, weight: torch.Tensor, *, epochs: int, lr: float,
          batch_size: int, warmup: float, seed: int, head_type: str = "linear", mlp_hidden: int = 256,
          progress: bool = True) -> tuple[dict[int, dict[str, torch.Tensor]], dict[int, torch.Tensor]]:
    """Fit a head of ``head_type`` (linear or mlp, of hidden size ``mlp_hidden``) for each layer on
    KL(final || head) over ``weight``'s rows (the restricted vocabulary).

    ``norm``: the base model's final norm; ``weight``: [K, D] LM-head rows, on ``split``'s device.
    Returns each head's tensors (float32, by the names of ``exit_heads.HEAD_TENSORS``) and the
    mean loss of every epoch per layer ([epochs] float64), all on that device: without progress
    bars the loop never waits for the device. The batches and an MLP's initial ``W1`` depend on
    ``seed`` only (CPU generators), not on the device.
    """
    from tqdm.auto import tqdm

    device = split.final.device
    weight = weight.float()  # the teacher and the student score in float32
    d = split.final.shape[1]
    init = torch.Generator().manual_seed(seed)  # each MLP's W1, drawn layer by layer

    def new_head() -> LinearHead:
        return MLPHead(d, mlp_hidden, norm.variance_epsilon, generator=init) if head_type == "mlp" else LinearHead(d)

    heads = {l: new_head().to(device) for l in layers}
    opt = torch.optim.Adam([p for head in heads.values() for p in head.parameters()], lr=lr)
    steps_per_epoch = math.ceil(split.tokens / batch_size)
    total = max(1, epochs * steps_per_epoch)
    warm = max(1, int(warmup * total))

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(seed)
    history: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    bar = tqdm(total=total, desc="train", unit="step", disable=not progress)
    for epoch in range(epochs):
        perm = torch.randperm(split.tokens, generator=gen).to(device)
        # per-layer loss sums, on the device (float64: the same sums as Python floats would be)
        sums = {l: torch.zeros((), dtype=torch.float64, device=device) for l in layers}
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size : (s + 1) * batch_size]
            with torch.no_grad():  # final is normed already
                teacher = F.log_softmax(F.linear(split.final[idx].float(), weight), dim=-1)  # [B, K]
            loss = 0.0
            for l in layers:
                logits = head_logits(heads[l].tensors(), split.hidden[l][idx].float(), norm, weight)
                student = F.log_softmax(logits, dim=-1)
                loss_l = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
                sums[l] += loss_l.detach().double() * len(idx)
                loss = loss + loss_l
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            if progress and (s % 50 == 0 or s == steps_per_epoch - 1):  # a host sync: only now and then
                bar.set_postfix(epoch=epoch + 1, kl=f"{loss.item() / len(layers):.3f}")
        for l in layers:
            history[l].append(sums[l] / split.tokens)
    bar.close()
    tensors = {l: {name: t.detach() for name, t in head.tensors().items()} for l, head in heads.items()}
    return tensors, {l: torch.stack(h) for l, h in history.items()}
