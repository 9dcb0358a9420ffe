"""The greedy pass: the frozen base model answers every prompt and keeps, for each token it
generates, the hidden states that produced it (the heads' inputs) and the final layer's state
(the teacher's input). Everything stays on the model's device, in its dtype.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Split:
    """Tokens the base model generated for one prompt set, with what the heads need."""

    name: str
    file: str
    prompts: int
    hidden: dict[int, torch.Tensor]  # layer -> [N, D], the input of that layer
    final: torch.Tensor  # [N, D], the last layer's output after the final norm
    targets: torch.Tensor  # [N], the final layer's greedy token

    @property
    def tokens(self) -> int:
        return self.targets.shape[0]


def encode(tokenizer, prompt: str | list[dict]) -> list[int]:
    """Token ids exactly as ``Engine.encode`` makes them: messages through the chat template."""
    if isinstance(prompt, list):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("a prompt has chat messages but the model's tokenizer has no chat template")
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(prompt).input_ids


def eos_ids(model, tokenizer) -> list[int]:
    """Every EOS id the model's config, generation config or tokenizer names, sorted."""
    ids = set()
    config_ids = (getattr(model.generation_config, "eos_token_id", None), model.config.eos_token_id,
                  tokenizer.eos_token_id)
    for c in config_ids:
        ids.update([c] if isinstance(c, int) else (c or []))
    if not ids:
        raise ValueError("the model defines no EOS token (config, generation_config or tokenizer)")
    return sorted(ids)


def load_base(resolved, device, dtype, command: str):
    """The frozen base model of ``resolved`` (a ``ResolvedModel``) on ``device`` in ``dtype``, with
    what a greedy pass over it needs: ``(base, tokenizer, eos ids, the id that pads a batch)``.
    ``command`` names the caller in the error for a model without a tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not resolved.has_tokenizer:
        raise ValueError(f"{resolved.path} has no tokenizer files; {command} needs one to encode the prompts")
    tokenizer = AutoTokenizer.from_pretrained(str(resolved.path))
    base = AutoModelForCausalLM.from_pretrained(str(resolved.path), dtype=dtype, device_map=device).eval()
    base.requires_grad_(False)
    eos = eos_ids(base, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    return base, tokenizer, eos, pad


@torch.inference_mode()
def collect(model, prompts: Sequence[list[int]], layers: Sequence[int], *, max_new_tokens: int,
            batch_size: int, eos: Sequence[int], pad: int, progress: bool = True) -> list[dict]:
    """Greedy continuations of ``prompts`` with the hidden states that produced each new token.

    Returns, per prompt in input order, ``{"hidden": {l: [n, D]}, "final": [n, D], "tokens": [n]}``
    on the model's device, where token ``t`` (up to and including the first EOS) was predicted
    from those states.

    A plain batched greedy loop over transformers' model rather than ``generate``: a row that
    reaches EOS leaves the batch (and its KV cache) at once, so the many short answers do not
    keep paying for the long ones (``generate`` halved the useful throughput on our prompts).
    """
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    device = model.device
    num_layers = model.config.num_hidden_layers
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    eos_t = torch.tensor(sorted(eos), device=device)
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))  # similar lengths: less padding
    results: list[dict | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress)
    for b in range(0, len(order), batch_size):
        rows = order[b : b + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):  # left padding: every row's next token is at the end
            ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=model.config)
        got = {i: {"hidden": {l: [] for l in layers}, "final": [], "tokens": []} for i in rows}
        active = list(rows)
        for _ in range(max_new_tokens):
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                        output_hidden_states=True, logits_to_keep=1, **{cache_kw: cache})
            # hidden_states[k]: [B, S, D]; k = l is the input of layer l, k = num_layers the
            # final-normed output; the last position is the one that predicts the next token.
            last = {k: out.hidden_states[k][:, -1].clone() for k in (*layers, num_layers)}  # [B, D]
            nxt = out.logits[:, -1].argmax(-1)  # [B]
            for r, i in enumerate(active):  # views of device tensors: no copy, no sync
                g = got[i]
                for l in layers:
                    g["hidden"][l].append(last[l][r])
                g["final"].append(last[num_layers][r])
                g["tokens"].append(nxt[r])
            # The one host transfer of a step, [B] booleans: which rows reached EOS and leave the
            # batch (with their KV cache) now. The tokens and states themselves stay on the device.
            done = torch.isin(nxt, eos_t).tolist()
            if all(done):
                break
            if any(done):
                keep = [r for r, d in enumerate(done) if not d]
                bar.update(len(done) - len(keep))
                active = [active[r] for r in keep]
                keep = torch.tensor(keep, device=device)
                cache.batch_select_indices(keep)
                nxt, mask, pos = nxt[keep], mask[keep], pos[keep]
            ids = nxt[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos[:, -1:] + 1
        bar.update(len(active))
        for i in rows:
            g = got[i]
            results[i] = {
                "hidden": {l: torch.stack(g["hidden"][l]) for l in layers},
                "final": torch.stack(g["final"]),
                "tokens": torch.stack(g["tokens"]),
            }
        del cache, out
    bar.close()
    return results


def make_split(name: str, file: str, items: list[dict], layers: Sequence[int]) -> Split:
    """One ``Split`` from ``collect``'s items for the prompts of ``file`` named ``name``."""
    return Split(
        name=name,
        file=file,
        prompts=len(items),
        hidden={l: torch.cat([it["hidden"][l] for it in items]) for l in layers},
        final=torch.cat([it["final"] for it in items]),
        targets=torch.cat([it["tokens"] for it in items]),
    )
