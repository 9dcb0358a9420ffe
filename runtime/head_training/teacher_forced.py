"""Teacher-forced collection: one prefill gives every layer's state at every position.

Decoding (collect.py) yields one training token per forward step. A prefill over a whole
sequence (a prompt and the model's own greedy answer, or any text) yields the states of every
position at every layer in one pass, with the final layer's state as the self-distillation
teacher at each position: orders of magnitude more tokens per CPU-minute. The states entering
layer ``l`` at a position are what the exit head at ``l`` would see when decoding that position
(up to floating-point reduction order: a prefill is a different chunk shape).

A ``SeqStates`` keeps the sequences whole (``offsets``), so heads that attend over earlier
positions' states (the adapter head of families.py) train on them teacher-forced.

The validation split stays on-policy: the model's own greedy answers to the validation prompts
(every ``val_every``-th train prompt, exactly pipeline.py's rule), and only the answer
positions are scored (``scored``), as collect.py would have produced them.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .validation import split_prompts as validation_split


def split_prompts(prompts: Sequence, every: int) -> dict[str, list]:
    """pipeline.py's rule (validation.split_prompts), by name: every ``every``-th prompt
    (1-based) is validation, the rest train."""
    train, validation = validation_split(list(prompts), every)
    return {"train": train, "validation": validation}


@dataclass
class SeqStates:
    """Per-position states of many sequences, concatenated along positions.

    ``hidden[l]``: [N, D] the input of layer ``l`` (float16 on the host to save memory);
    ``final``: [N, D] the final-normed last state (the teacher's input); ``targets``: [N] the
    final layer's argmax over the full vocabulary (the token greedy decoding emits next);
    ``tokens``: [N] the input token at each position; ``offsets``: [S+1] sequence boundaries;
    ``scored``: [N] bool, positions that count for training/evaluation (e.g. answer positions).
    """

    hidden: dict[int, torch.Tensor]
    final: torch.Tensor
    targets: torch.Tensor
    tokens: torch.Tensor
    offsets: torch.Tensor
    scored: torch.Tensor

    @property
    def tokens_scored(self) -> int:
        return int(self.scored.sum())

    @property
    def num_sequences(self) -> int:
        return len(self.offsets) - 1

    def subset(self, seqs: Iterable[int]) -> SeqStates:
        """The sequences with indices ``seqs``, in that order."""
        seqs = list(seqs)
        idx = torch.cat([torch.arange(int(self.offsets[s]), int(self.offsets[s + 1])) for s in seqs])
        lens = torch.tensor([int(self.offsets[s + 1] - self.offsets[s]) for s in seqs])
        return SeqStates({l: h[idx] for l, h in self.hidden.items()}, self.final[idx], self.targets[idx],
                         self.tokens[idx], torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]),
                         self.scored[idx])

    @staticmethod
    def concat(parts: Sequence[SeqStates]) -> SeqStates:
        offs, at = [torch.zeros(1, dtype=torch.long)], 0
        for p in parts:
            offs.append(p.offsets[1:] + at)
            at += int(p.offsets[-1])
        return SeqStates({l: torch.cat([p.hidden[l] for p in parts]) for l in parts[0].hidden},
                         torch.cat([p.final for p in parts]), torch.cat([p.targets for p in parts]),
                         torch.cat([p.tokens for p in parts]), torch.cat(offs), torch.cat([p.scored for p in parts]))

    def save(self, path: str) -> None:
        torch.save({"hidden": self.hidden, "final": self.final, "targets": self.targets, "tokens": self.tokens,
                    "offsets": self.offsets, "scored": self.scored}, path)

    @staticmethod
    def load(path: str) -> SeqStates:
        return SeqStates(**torch.load(path))


def greedy_answers(model, prompts: Sequence[list[int]], *, max_new_tokens: int, batch_size: int,
                   eos: Sequence[int], pad: int, progress: bool = False) -> list[list[int]]:
    """The model's greedy answer to each prompt (up to and including the first EOS), by
    collect.py's batched loop (the same tokens the existing pipeline trains and validates on)."""
    from .collect import collect

    items = collect(model, prompts, [], max_new_tokens=max_new_tokens, batch_size=batch_size,
                    eos=eos, pad=pad, progress=progress)
    return [it["tokens"].tolist() for it in items]


@torch.inference_mode()
def teacher_forced(model, sequences: Sequence[list[int]], layers: Sequence[int], *,
                   score_from: Sequence[int] | None = None, store_dtype: torch.dtype = torch.float16,
                   progress: bool = False) -> SeqStates:
    """Prefill each sequence once and keep, at every position, the inputs of ``layers``, the
    final-normed state and the final layer's argmax (over the full vocabulary).

    ``score_from[i]``: the first position of sequence ``i`` that is scored (a position ``p`` predicts
    token ``p+1``; for a prompt of length ``n`` followed by its answer, ``n - 1``); the last
    position of a sequence predicts past its end and is scored only when nothing follows it
    in the text (it is, for an answer: it predicts what follows EOS; it is dropped here).
    """
    from tqdm.auto import tqdm

    num_layers = model.config.num_hidden_layers
    lm_head = model.lm_head.weight
    hid = {l: [] for l in layers}
    fin, tgt, toks, lens, scored = [], [], [], [], []
    for i, seq in enumerate(tqdm(sequences, desc="prefill", disable=not progress)):
        ids = torch.tensor(seq, device=model.device)[None]
        out = model.model(input_ids=ids, output_hidden_states=True, use_cache=False)
        hs = out.hidden_states  # [num_layers + 1] x [1, S, D]; [num_layers] is final-normed
        n = ids.shape[1] - 1  # the last position predicts past the sequence: dropped
        for l in layers:
            hid[l].append(hs[l][0, :n].to("cpu", store_dtype))
        final = hs[num_layers][0, :n]
        fin.append(final.to("cpu", store_dtype))
        tgt.append(torch.nn.functional.linear(final, lm_head).argmax(-1).cpu())
        toks.append(ids[0, :n].cpu())
        s = torch.zeros(n, dtype=torch.bool)
        s[(score_from[i] if score_from is not None else 0):] = True
        scored.append(s)
        lens.append(n)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(lens).cumsum(0)])
    return SeqStates({l: torch.cat(hid[l]) for l in layers}, torch.cat(fin), torch.cat(tgt), torch.cat(toks),
                     offsets, torch.cat(scored))


def local_text_chunks(tokenizer, max_tokens: int, *, chunk: int = 512, seed: int = 0,
                      roots: Sequence[str] = ("/usr/lib/python3*/", "/usr/share/doc/")) -> list[list[int]]:
    """Chunks of ``chunk`` tokens (BOS-free, as the tokenizer encodes plain text) from local text
    files: Python stdlib sources and docs, /usr/share/doc. Files are shuffled by ``seed``; at
    most two chunks per file, so that the data is diverse; stops at ``max_tokens`` tokens."""
    import random

    files = []
    for root in roots:
        for base in glob.glob(root):
            for dirpath, _, names in os.walk(base):
                if "site-packages" in dirpath or "dist-packages" in dirpath or "__pycache__" in dirpath:
                    continue
                for n in names:
                    if n.endswith((".py", ".txt", ".md", ".rst")) or n in ("README", "copyright", "changelog"):
                        files.append(os.path.join(dirpath, n))
    files.sort()
    random.Random(seed).shuffle(files)
    out, total = [], 0
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                text = fh.read(40000)
        except (OSError, UnicodeDecodeError):
            continue
        if len(text) < 400:
            continue
        ids = tokenizer(text, add_special_tokens=False).input_ids
        for a in range(0, min(len(ids), 2 * chunk), chunk):
            piece = ids[a : a + chunk]
            if len(piece) < 64:
                break
            out.append(piece)
            total += len(piece)
        if total >= max_tokens:
            break
    return out
