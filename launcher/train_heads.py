"""`adadecode train-heads`: exit heads for a base model, by self-distillation.

The frozen base model answers every prompt greedily (a batched, left-padded
loop over transformers' model that also keeps the hidden states which produced
each new token). Each head `T_l` (d x d, identity at start) is then trained on
KL(final || head) over the generated tokens: the final layer's distribution is
the teacher, `lm_head(final_norm(T_l h_l))` the student (Adam, warmup + cosine).
The heads are calibrated on prompts they never saw, and the default layers and
thresholds are chosen by an expected-saving model (`CostModel`). Writes
`heads.safetensors` + `manifest.json` to --out.

The heads shipped for the bundled model (the exact command is in their manifest):

    taskset -c 0,1 adadecode train-heads --threads 2 --out runtime/assets/heads/smollm2-135m-instruct

Another model, then decoding with its heads:

    adadecode train-heads --model ~/models/Qwen2.5-0.5B-Instruct --out heads/qwen --threads 2
    adadecode generate --model ~/models/Qwen2.5-0.5B-Instruct --decoding.heads=heads/qwen \\
        --early-exit deferred --prompt "..." --chat

Data: `--prompts` minus every `--val-every`-th prompt (the validation prompts,
never trained on, on which the defaults are chosen); `--heldout` is only ever
evaluated (the calibration table), never fitted on (data/prompts/README.md).

Restricted vocabulary: the heads score only the K most frequent output tokens
(`--vocab-size`, `--vocab-coverage`); see runtime/exit_heads.py for why.
Training and calibration use the same restricted softmax that runs.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

THRESHOLD_SWEEP = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99)
# On the bundled model, K=1024 (~90% of the train outputs, ~79% of unseen prompts') beat 2048,
# 4096, 8192 and the full vocabulary on the validation prompts: each 1024 rows cost ~0.4% of a
# decode step, and the tokens past them are rare ones an early head seldom gets right anyway.
DEFAULT_VOCAB_SIZE = 1024


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adadecode train-heads",
        description="Train exit heads for a base model by self-distillation (base model frozen).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="bundled:smollm2-135m-instruct",
                   help="model source: bundled:<name>, a Hugging Face directory or a .gguf file")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (heads.safetensors, manifest.json)")
    p.add_argument("--layers", default="auto",
                   help="candidate head layers, e.g. 8,12,16 (a head at l reads the input of layer l); "
                        "auto: every L/10 layers from 0.13 L to L-2 (4,7,..,28 for 30 layers)")
    p.add_argument("--prompts", default="data/prompts/train.jsonl", help="training prompts (JSONL)")
    p.add_argument("--heldout", default="data/prompts/heldout.jsonl",
                   help="held-out prompts (JSONL), evaluated only: the calibration table")
    p.add_argument("--val-every", type=int, default=10, metavar="N",
                   help="keep every N-th training prompt out of training, to choose the defaults on")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="greedy tokens generated per prompt")
    p.add_argument("--gen-batch-size", type=int, default=48, metavar="N", help="prompts per batch of the greedy generation loop")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3, help="peak Adam learning rate")
    p.add_argument("--batch-size", type=int, default=256, metavar="N", help="tokens per training step")
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of the steps with a linear warmup")
    vocab = p.add_mutually_exclusive_group()
    vocab.add_argument("--vocab-size", type=_vocab_size, default=None, metavar="K|full",
                       help=f"the heads score only the K most likely output tokens (default {DEFAULT_VOCAB_SIZE}); "
                            "full: the whole vocabulary")
    vocab.add_argument("--vocab-coverage", type=float, default=None, metavar="F",
                       help="instead of --vocab-size: the fewest tokens covering this share of the greedy "
                            "outputs on the train prompts (e.g. 0.99)")
    p.add_argument("--eval-cost", type=float, default=None, metavar="C",
                   help="cost of one head evaluation in decode steps, for choosing the defaults "
                        "(default: estimated from K, see eval_cost())")
    p.add_argument("--merge-cost", type=float, default=1.1, metavar="C",
                   help="cost of a 2-row chunk through the layers relative to one row (deferred backfill), "
                        "for choosing the defaults")
    p.add_argument("--rollback-cost", type=_rollback_cost, default=1.0, metavar="C|structural",
                   help="decode steps wasted by a rejected early token, for choosing the defaults; structural: "
                        "only the next token's pass up to the head (see CostModel)")
    p.add_argument("--save-dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                   help="dtype of the stored T matrices (calibration uses the stored values)")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 leaves torch's default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


# --- data ----------------------------------------------------------------------------------------

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


@torch.inference_mode()
def collect(model, prompts: Sequence[list[int]], layers: Sequence[int], *, max_new_tokens: int,
            batch_size: int, eos: Sequence[int], pad: int, progress: bool = True) -> list[dict]:
    """Greedy continuations of ``prompts`` with the hidden states that produced each new token.

    Returns, per prompt in input order, ``{"hidden": {l: [n, D]}, "final": [n, D], "tokens": [n]}``
    where token ``t`` (up to and including the first EOS) was predicted from those states.

    A plain batched greedy loop over transformers' model rather than ``generate``: a row that
    reaches EOS leaves the batch (and its KV cache) at once, so the many short answers do not
    keep paying for the long ones (``generate`` halved the useful throughput on our prompts).
    """
    import inspect

    from tqdm.auto import tqdm
    from transformers import DynamicCache

    num_layers = model.config.num_hidden_layers
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    eos_t = torch.tensor(sorted(eos))
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
            nxt = out.logits[:, -1].argmax(-1)
            for r, i in enumerate(active):
                g = got[i]
                for l in layers:
                    g["hidden"][l].append(last[l][r])
                g["final"].append(last[num_layers][r])
                g["tokens"].append(nxt[r])
            done = torch.isin(nxt, eos_t)
            if done.all():
                break
            if done.any():
                keep = (~done).nonzero().flatten()
                cache.batch_select_indices(keep)
                active = [active[k] for k in keep.tolist()]
                nxt, mask, pos = nxt[keep], mask[keep], pos[keep]
                bar.update(int(done.sum()))
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
    return Split(
        name=name,
        file=file,
        prompts=len(items),
        hidden={l: torch.cat([it["hidden"][l] for it in items]) for l in layers},
        final=torch.cat([it["final"] for it in items]),
        targets=torch.cat([it["tokens"] for it in items]),
    )


@torch.inference_mode()
def soft_counts(final: torch.Tensor, weight: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Expected count of every token under the final layer's distribution, summed over positions.

    # final: [N, D] (already normed); weight: [V, D] -> [V]
    """
    total = torch.zeros(weight.shape[0])
    for a in range(0, final.shape[0], chunk):
        total += torch.softmax(F.linear(final[a : a + chunk], weight), dim=-1).sum(0)
    return total


def choose_vocabulary(targets: torch.Tensor, vocab_size: int, *, size: str | None = None,
                      coverage: float | None = None, soft: Callable[[], torch.Tensor] | None = None
                      ) -> torch.Tensor | None:
    """Ids of the restricted vocabulary (None: the full one), most likely first.

    K is ``size``, or the fewest tokens covering ``coverage`` of ``targets`` (the greedy outputs).
    Tokens rank by their count in ``targets``; when K exceeds the tokens seen there, the rest rank
    by ``soft()`` (``soft_counts``: plausible alternatives first), which covers ~2 points more of
    unseen prompts' outputs at K=4096 on the bundled model than filling in id order. Ties: lower id.
    """
    if size == "full":
        return None
    counts = torch.bincount(targets, minlength=vocab_size).double()
    order = torch.sort(-counts, stable=True).indices
    if size is not None:
        k = min(int(size), vocab_size)
    else:
        cum = torch.cumsum(counts[order], 0) / counts.sum()
        k = int(torch.searchsorted(cum, torch.tensor(coverage, dtype=torch.float64))) + 1
    seen = int((counts > 0).sum())
    if k > seen and soft is not None:
        rest = order[seen:]
        order = torch.cat([order[:seen], rest[torch.sort(-soft()[rest].double(), stable=True).indices]])
    return order[: max(1, k)].clone()


# --- training ------------------------------------------------------------------------------------

def train(split: Split, layers: Sequence[int], norm, weight: torch.Tensor, *, epochs: int, lr: float,
          batch_size: int, warmup: float, seed: int, progress: bool = True) -> tuple[dict[int, torch.Tensor], dict]:
    """Fit ``T_l`` for each layer on KL(final || head) over ``weight``'s rows (the restricted vocabulary).

    Returns the matrices and the mean loss of every epoch per layer.
    """
    from adadecode.runtime.exit_heads import head_logits
    from tqdm.auto import tqdm

    d = split.final.shape[1]
    transforms = {l: torch.nn.Parameter(torch.eye(d)) for l in layers}
    opt = torch.optim.Adam(transforms.values(), lr=lr)
    steps_per_epoch = math.ceil(split.tokens / batch_size)
    total = max(1, epochs * steps_per_epoch)
    warm = max(1, int(warmup * total))

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(seed)
    history: dict[int, list[float]] = {l: [] for l in layers}
    bar = tqdm(total=total, desc="train", unit="step", disable=not progress)
    for epoch in range(epochs):
        perm = torch.randperm(split.tokens, generator=gen)
        sums = {l: 0.0 for l in layers}
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size : (s + 1) * batch_size]
            with torch.no_grad():
                teacher = F.log_softmax(F.linear(split.final[idx], weight), dim=-1)  # final is normed already
            loss = 0.0
            for l in layers:
                student = F.log_softmax(head_logits(transforms[l], split.hidden[l][idx], norm, weight), dim=-1)
                loss_l = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
                sums[l] += loss_l.item() * len(idx)
                loss = loss + loss_l
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, kl=f"{loss.item() / len(layers):.3f}")
        for l in layers:
            history[l].append(sums[l] / split.tokens)
    bar.close()
    return {l: t.detach() for l, t in transforms.items()}, history


# --- calibration and the default choice ------------------------------------------------------------

def head_outcomes(heads, split: Split, chunk: int = 4096) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per head layer: (confidence [N], agrees with the final layer [N]) on ``split``."""
    outcomes = {}
    for l in heads.available_layers:
        confs, agrees = [], []
        for a in range(0, split.tokens, chunk):
            ids, conf = heads.predict_batch(l, split.hidden[l][a : a + chunk])
            confs.append(conf)
            agrees.append(ids == split.targets[a : a + chunk])
        outcomes[l] = (torch.cat(confs), torch.cat(agrees))
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


@dataclass(frozen=True)
class CostModel:
    """What an early exit is worth, in decode steps (one token through every layer), on one device
    with deferred backfill: an early token at layer ``l`` leaves its layers ``l..L-1`` to run merged
    with the next token's pass through them, as one 2-row chunk costing ``merge_cost`` rows.

    - accepted: the two tokens cost ``2 l/L + merge_cost (L-l)/L`` instead of 2, a saving of
      ``(2 - merge_cost)(L-l)/L`` (``(L-l)/L`` when a 2-row chunk costs one row);
    - rejected: ``rollback_cost`` (default: a whole token). None is the structural cost, the next
      token's pass thrown away, ``l/L + (merge_cost - 1)(L-l)/L``; it ignores tokens emitted early
      behind the rejected one and the rollback's own overhead. On the bundled model's validation
      prompts the defaults chosen with a whole token lose 0.01 step/token if the true cost is the
      structural one, while those chosen with the structural cost lose 0.04 if it is a whole token;
      hence the default.
    - every head evaluation costs ``eval_cost``.
    """

    num_layers: int
    eval_cost: float
    merge_cost: float = 1.1
    rollback_cost: float | None = 1.0

    def accept_saving(self, layer: int) -> float:
        return (2 - self.merge_cost) * (self.num_layers - layer) / self.num_layers

    def reject_cost(self, layer: int) -> float:
        if self.rollback_cost is not None:
            return self.rollback_cost
        rest = (self.num_layers - layer) / self.num_layers
        return layer / self.num_layers + (self.merge_cost - 1) * rest


def expected_saving(outcomes, selection: dict[int, float], cost: CostModel) -> dict:
    """Simulate the heads of ``selection`` ({layer: threshold}) in layer order on every token of
    ``outcomes``: a token exits at the first head whose confidence exceeds its threshold and is not
    evaluated further. Returns the mean saving per token under ``cost`` and the rates behind it."""
    n = len(next(iter(outcomes.values()))[0])
    remaining = torch.ones(n, dtype=torch.bool)
    saved = evals = accepted = rejected = 0.0
    for l in sorted(selection):
        conf, agree = outcomes[l]
        evals += float(remaining.sum())
        exits = remaining & (conf > selection[l])
        good, bad = float((exits & agree).sum()), float((exits & ~agree).sum())
        saved += good * cost.accept_saving(l) - bad * cost.reject_cost(l)
        accepted, rejected = accepted + good, rejected + bad
        remaining &= ~exits
    saving = (saved - cost.eval_cost * evals) / n
    return {
        "saving_per_token": round(saving, 4),
        "speedup_estimate": round(1 / (1 - saving), 3),
        "exit_rate": round((accepted + rejected) / n, 4),
        "acceptance": round(accepted / (accepted + rejected), 4) if accepted + rejected else None,
        "head_evals_per_token": round(evals / n, 3),
    }


def choose_defaults(outcomes, cost: CostModel, sweep: Sequence[float] = THRESHOLD_SWEEP
                    ) -> tuple[dict[int, float], dict[int, float]]:
    """Default heads by coordinate ascent on ``expected_saving``: each head in turn gets the best of
    off or a sweep threshold, until nothing improves. Also a threshold for every head: the default's,
    or the best for that head alone. Returns (default {layer: threshold}, all {layer: threshold})."""

    def score(sel):
        return expected_saving(outcomes, sel, cost)["saving_per_token"]

    chosen: dict[int, float] = {}
    best = score(chosen)
    for _ in range(10):
        improved = False
        for l in sorted(outcomes):
            for option in (None, *sweep):
                trial = {k: v for k, v in chosen.items() if k != l}
                if option is not None:
                    trial[l] = option
                s = score(trial)
                if s > best + 1e-9:
                    best, chosen, improved = s, trial, True
        if not improved:
            break
    alone = {l: chosen.get(l) or max(sweep, key=lambda t: (score({l: t}), t)) for l in outcomes}
    return dict(sorted(chosen.items())), dict(sorted(alone.items()))


def eval_cost(k: int, hidden_size: int, weights_per_step: int) -> float:
    """A head evaluation's cost in decode steps: the weights it reads (T and K LM-head rows) over the
    weights a decode step reads, plus 0.2% for the call. On the bundled model and one CPU thread this
    is within 0.1% of the in-situ timings for K = 1024, 2048, 4096 (0.9%, 1.3%, 2.0% of a 51 ms
    step) and overestimates larger heads (K=8192: 4.0% against 3.4%; full: 21% against 17%)."""
    return 0.002 + (hidden_size * hidden_size + k * hidden_size) / weights_per_step


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- the command -----------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        return run(args, argv)
    except ValueError as e:
        print(f"adadecode train-heads: error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from adadecode.runtime.exit_heads import ExitHeads, save_exit_heads
    from adadecode.runtime.hf_adapter import load_hf_config
    from adadecode.runtime.model_source import resolve_model
    from adadecode.runtime.prompts import read_prompts
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_start = time.perf_counter()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    progress = not args.no_progress
    log = lambda msg: print(f"[train-heads {time.perf_counter() - t_start:6.0f}s] {msg}", file=sys.stderr, flush=True)  # noqa: E731

    resolved = resolve_model(args.model)
    config = load_hf_config(resolved.path)
    num_layers, d, vocab = config.num_hidden_layers, config.hidden_size, config.vocab_size
    layers = _parse_layers(args.layers, num_layers)
    if not resolved.has_tokenizer:
        raise ValueError(f"{resolved.path} has no tokenizer files; train-heads needs one to encode the prompts")
    tokenizer = AutoTokenizer.from_pretrained(str(resolved.path))
    model = AutoModelForCausalLM.from_pretrained(str(resolved.path), dtype=torch.float32).eval()
    model.requires_grad_(False)
    norm, lm_head = model.model.norm, model.lm_head.weight

    train_prompts = read_prompts(args.prompts)
    held_prompts = read_prompts(args.heldout)
    every = args.val_every
    if every < 2 or len(train_prompts) < every:
        raise ValueError(f"--val-every {every}: need at least 2 and at most the {len(train_prompts)} prompts of "
                         f"{args.prompts}, so that both training and validation prompts remain (the defaults are "
                         "chosen on the validation prompts; the held-out ones are for evaluation only)")
    is_val = [(i + 1) % every == 0 for i in range(len(train_prompts))]
    groups = {
        "train": [p for p, v in zip(train_prompts, is_val) if not v],
        "validation": [p for p, v in zip(train_prompts, is_val) if v],
        "heldout": held_prompts,
    }
    ids = {name: [encode(tokenizer, p) for p in ps] for name, ps in groups.items()}
    eos = sorted(_eos_ids(model, tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    log(f"{resolved.origin}: {num_layers} layers, hidden {d}, vocab {vocab}; candidate heads at {layers}; "
        f"prompts: {', '.join(f'{k} {len(v)}' for k, v in ids.items())}")

    everything = [x for name in groups for x in ids[name]]
    items = collect(model, everything, layers, max_new_tokens=args.max_new_tokens,
                    batch_size=args.gen_batch_size, eos=eos, pad=pad, progress=progress)
    splits, at = {}, 0
    files = {"train": args.prompts, "validation": args.prompts, "heldout": args.heldout}
    for name in groups:
        splits[name] = make_split(name, files[name], items[at : at + len(ids[name])], layers)
        at += len(ids[name])
    del items
    t_collect = time.perf_counter() - t_start
    log("generated tokens: " + ", ".join(f"{k} {s.tokens}" for k, s in splits.items()))

    size = args.vocab_size or (None if args.vocab_coverage else str(DEFAULT_VOCAB_SIZE))
    vocab_ids = choose_vocabulary(splits["train"].targets, vocab, size=size, coverage=args.vocab_coverage,
                                  soft=lambda: soft_counts(splits["train"].final, lm_head))
    weight = lm_head if vocab_ids is None else lm_head[vocab_ids].contiguous()
    k = weight.shape[0]
    coverage = {name: round(_coverage(s.targets, vocab_ids), 4) for name, s in splits.items()}
    log(f"vocabulary: {k} tokens; coverage of the greedy outputs {coverage}")

    transforms, history = train(
        splits["train"], layers, norm, weight, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        warmup=args.warmup, seed=args.seed, progress=progress,
    )
    t_train = time.perf_counter() - t_start - t_collect
    log("KL per epoch: " + "; ".join(f"{l}: {h[0]:.3f} -> {h[-1]:.3f}" for l, h in history.items()))

    # Calibrate what will run: the matrices as stored (rounded to --save-dtype), the restricted head.
    save_dtype = getattr(torch, args.save_dtype)
    stored = {l: t.to(save_dtype).float() for l, t in transforms.items()}
    heads = ExitHeads(stored, norm, weight, vocab_ids, {l: 0.0 for l in layers},
                      {"default_layers": [], "default_thresholds": {}})
    outcomes = {name: head_outcomes(heads, splits[name]) for name in ("validation", "heldout")}
    choice_split = "validation"
    per_token = sum(p.numel() for p in model.model.layers.parameters()) + lm_head.numel()  # weights read per step
    cost = CostModel(
        num_layers=num_layers,
        eval_cost=args.eval_cost if args.eval_cost is not None else eval_cost(k, d, per_token),
        merge_cost=args.merge_cost,
        rollback_cost=args.rollback_cost,
    )
    default, per_head = choose_defaults(outcomes[choice_split], cost)
    estimate = {name: expected_saving(o, default, cost) for name, o in outcomes.items()}
    log(f"defaults: {default} ({cost}); expected: {estimate}")

    manifest = {
        "base_model": {
            "fingerprint": resolved.fingerprint,
            "origin": resolved.origin,
            "model_type": config.model_type,
            "num_layers": num_layers,
            "hidden_size": d,
            "vocab_size": vocab,
        },
        "head_type": "linear",
        "layers": layers,
        "default_layers": sorted(default),
        "default_thresholds": {str(l): t for l, t in per_head.items()},
        "vocabulary": {
            "restricted": vocab_ids is not None,
            "size": k,
            "coverage_target": args.vocab_coverage,
            "coverage": coverage,
        },
        "choice": {
            "note": (
                f"Defaults chosen on the validation prompts (every {every}-th train prompt, never trained on)"
                " by coordinate ascent over each head's threshold (off or one of the sweep), maximising the "
                "expected saving per token on one device with deferred backfill: a token exits at the first "
                "head above its threshold; an accepted exit at layer l saves (2 - merge_cost)(L-l)/L of a "
                "decode step (its last layers run merged with the next token's), a rejected one costs "
                "rollback_cost (null: the next token's pass, l/L + (merge_cost - 1)(L-l)/L), and each "
                f"head evaluation costs eval_cost (T_l plus K={k} LM-head rows over the weights of a decode "
                "step, plus 0.2% for the call; matches in-situ timings on one CPU thread). Heads outside the "
                "defaults carry the threshold best for them alone."
            ),
            "split": choice_split,
            "cost_model": {"eval_cost": round(cost.eval_cost, 5), "merge_cost": cost.merge_cost,
                           "rollback_cost": cost.rollback_cost},
            "expected": estimate,
            "alone": {str(l): expected_saving(outcomes[choice_split], {l: t}, cost) for l, t in per_head.items()},
        },
        "calibration": calibration_table(outcomes["heldout"], splits["heldout"]),
        "validation_calibration": calibration_table(outcomes["validation"], splits["validation"]),
        "training": {
            "command": shlex.join(["adadecode", "train-heads", *argv]),
            "argv": list(argv),
            "data": {
                name: {"file": s.file, "sha256": _sha256(s.file), "prompts": s.prompts, "tokens": s.tokens}
                for name, s in splits.items()
            },
            "hyperparameters": {
                "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "warmup": args.warmup,
                "schedule": "linear warmup, cosine to 0", "optimizer": "Adam", "loss": "KL(final || head) over the head's vocabulary",
                "max_new_tokens": args.max_new_tokens, "val_every": every, "seed": args.seed,
                "save_dtype": args.save_dtype, "init": "identity",
            },
            "loss_per_epoch": {str(l): [round(x, 5) for x in h] for l, h in history.items()},
            "threads": torch.get_num_threads(),
            "seconds": {"collect": round(t_collect, 1), "train": round(t_train, 1),
                        "total": round(time.perf_counter() - t_start, 1)},
            "versions": {"torch": torch.__version__, "transformers": _version("transformers")},
        },
    }
    save_exit_heads(args.out, transforms, vocab_ids, manifest, dtype=save_dtype)
    log(f"wrote {args.out}: heads at {layers}, defaults {default}")
    return 0


def _vocab_size(value: str) -> str:
    if value != "full" and not (value.isdigit() and int(value) > 0):
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer or `full`")
    return value


def _rollback_cost(value: str) -> float | None:
    if value == "structural":
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number or `structural`") from None


def _parse_layers(spec: str, num_layers: int) -> list[int]:
    if spec == "auto":
        layers = list(range(max(1, round(0.13 * num_layers)), num_layers - 1, max(1, round(num_layers / 10))))
    else:
        try:
            layers = sorted({int(x) for x in spec.split(",") if x.strip()})
        except ValueError as e:
            raise ValueError(f"--layers {spec!r}: expected comma-separated integers such as 8,12,16, or auto") from e
    bad = [l for l in layers if not 0 < l < num_layers]
    if bad or not layers:
        raise ValueError(f"--layers {spec!r}: head layers must lie in 1..{num_layers - 1} for this "
                         f"{num_layers}-layer model (a head at l reads the input of layer l)")
    return layers


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for c in (getattr(model.generation_config, "eos_token_id", None), model.config.eos_token_id, tokenizer.eos_token_id):
        ids.update([c] if isinstance(c, int) else (c or []))
    if not ids:
        raise ValueError("the model defines no EOS token (config, generation_config or tokenizer)")
    return ids


def _coverage(targets: torch.Tensor, vocab_ids: torch.Tensor | None) -> float:
    if vocab_ids is None or not len(targets):
        return 1.0
    return float(torch.isin(targets, vocab_ids).float().mean())


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    sys.exit(main())
