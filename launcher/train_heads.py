"""`adadecode train-heads`: exit heads for a base model, by self-distillation.

The command-line face of ``adadecode.runtime.head_training.train_heads`` (runtime/head_training/:
the greedy pass, the vocabulary, training, calibration and the cost model that picks the
defaults). Writes `heads.safetensors` + `manifest.json` to --out.

The heads shipped for the bundled model (the exact command is in their manifest):

    taskset -c 0,1 adadecode train-heads --threads 2 --out runtime/assets/heads/smollm2-135m-instruct

Another model, then decoding with its heads:

    adadecode train-heads --model ~/models/Qwen2.5-0.5B-Instruct --out heads/qwen --threads 2
    adadecode generate --model ~/models/Qwen2.5-0.5B-Instruct --decoding.heads=heads/qwen \\
        --early-exit deferred --prompt "..." --chat

A 7B-70B model on a GPU (the greedy pass in bfloat16, the heads in float32; auto picks cuda:0
and bfloat16 whenever CUDA is there):

    adadecode train-heads --model ~/models/Llama-3.1-8B-Instruct --out heads/llama8b --device cuda:0

Heads of the MLP type (`T h` plus a small MLP: more exits at the same precision, for about
1.6x a linear head's time; runtime/exit_heads.py):

    adadecode train-heads --head-type mlp --mlp-hidden 256 --out heads/smollm2-mlp --threads 2

Data: `--prompts` minus every `--val-every`-th prompt (the validation prompts,
never trained on, on which the defaults are chosen), plus all of any
`--validation-extra` files (data/prompts/validation_mix.jsonl: code, chat and
plain text, as users send them); `--heldout` is only ever evaluated (the
calibration table), never fitted on (data/prompts/README.md).

Heads trained before per-token outcomes existed, or outcomes on other validation prompts, without
retraining (the heads' tensors stay byte for byte; the outcomes, the validation calibration and
the defaults are recomputed; the validation rule, model and max_new_tokens default to the manifest's):

    taskset -c 1 adadecode train-heads --outcomes-only --out runtime/assets/heads/smollm2-135m-instruct \\
        --validation-extra data/prompts/validation_mix.jsonl --threads 1
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Sequence

from adadecode.runtime.device import DTYPES, PlacementError
from adadecode.runtime.exit_heads import HEAD_TYPES
from adadecode.runtime.head_training import recompute_outcomes, train_heads
from adadecode.runtime.head_training.pipeline import SAVE_DTYPES
from adadecode.runtime.head_training.vocab import DEFAULT_VOCAB_SIZE

# One place for the defaults: train_heads()'s signature.
DEFAULTS = {name: p.default for name, p in inspect.signature(train_heads).parameters.items()}
# What --outcomes-only takes (recompute_outcomes()'s parameters); every other training option is refused with it.
OUTCOMES_ONLY = set(inspect.signature(recompute_outcomes).parameters) - {"progress", "argv"}
MANIFESTS = "; with --outcomes-only, by default the manifest's"
# ... for these options: left out, --outcomes-only takes what the manifest records
_MANIFESTS = {"model", "prompts", "val_every", "validation_extra", "max_new_tokens", "defaults_for", "defaults_policy"}


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(
        prog="adadecode train-heads",
        description="Train exit heads for a base model by self-distillation (base model frozen).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=d["model"],
                   help="model source: bundled:<name>, a Hugging Face directory or a .gguf file" + MANIFESTS)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (heads.safetensors, manifest.json)")
    p.add_argument("--layers", default=d["layers"],
                   help="candidate head layers, e.g. 8,12,16 (a head at l reads the input of layer l); "
                        "auto: every L/10 layers from 0.13 L to L-2 and the stage boundaries of 2-4 ranks "
                        "(4,7,9,10,12,13,16,18,19,22,25,28 for SmolLM2-135M)")
    p.add_argument("--prompts", default=d["prompts"], help="training prompts (JSONL)" + MANIFESTS)
    p.add_argument("--heldout", default=d["heldout"],
                   help="held-out prompts (JSONL), evaluated only: the calibration table")
    p.add_argument("--val-every", type=int, default=d["val_every"], metavar="N",
                   help="keep every N-th training prompt out of training, to choose the defaults on" + MANIFESTS)
    p.add_argument("--validation-extra", action="append", metavar="FILE[,FILE]",
                   help="prompt files (JSONL; repeatable or a comma list) whose prompts are added to the "
                        "validation prompts: their greedy answers are scored for the per-token outcomes and the "
                        "defaults, never trained on (e.g. data/prompts/validation_mix.jsonl); default none"
                        + MANIFESTS + " (none: drop them)")
    p.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"], metavar="N",
                   help="greedy tokens generated per prompt" + MANIFESTS)
    p.add_argument("--gen-batch-size", type=int, default=d["gen_batch_size"], metavar="N",
                   help="prompts per batch of the greedy generation loop")
    p.add_argument("--epochs", type=int, default=d["epochs"])
    p.add_argument("--lr", type=float, default=d["lr"], help="peak Adam learning rate")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], metavar="N", help="tokens per training step")
    p.add_argument("--warmup", type=float, default=d["warmup"], help="fraction of the steps with a linear warmup")
    p.add_argument("--head-type", choices=HEAD_TYPES, default=d["head_type"],
                   help="linear: f(h) = T h (the paper's); mlp: f(h) = T h + W2 silu(W1 rmsnorm(h)), "
                        "starting as the linear head")
    p.add_argument("--mlp-hidden", type=int, default=d["mlp_hidden"], metavar="N",
                   help="hidden size of the MLP of --head-type mlp")
    vocab = p.add_mutually_exclusive_group()
    vocab.add_argument("--vocab-size", type=_vocab_size, default=d["vocab_size"], metavar="K|full",
                       help=f"the heads score only the K most likely output tokens (default {DEFAULT_VOCAB_SIZE}); "
                            "full: the whole vocabulary")
    vocab.add_argument("--vocab-coverage", type=float, default=d["vocab_coverage"], metavar="F",
                       help="instead of --vocab-size: the fewest tokens covering this share of the greedy "
                            "outputs on the train prompts (e.g. 0.99)")
    p.add_argument("--defaults-for", type=int, default=d["defaults_for"], metavar="RANKS",
                   help="the manifest's default heads are those chosen for this many ranks (runtime/sim/heads.py); "
                        "at run time heads are chosen per setting unless decoding.auto_heads is false" + MANIFESTS)
    p.add_argument("--defaults-policy", choices=["eager", "deferred"], default=d["defaults_policy"],
                   help="the backfill policy the default heads are chosen for" + MANIFESTS)
    p.add_argument("--save-dtype", choices=SAVE_DTYPES, default=d["save_dtype"],
                   help="dtype of the stored head tensors (calibration uses the stored values)")
    p.add_argument("--device", default=d["device"], metavar="auto|cpu|cuda|cuda:N",
                   help="where the base model's greedy pass and the heads' training run; "
                        "auto: cuda:0 when CUDA is available, else cpu")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default=d["dtype"],
                   help="the base model's dtype (the heads train in float32 either way); "
                        "auto: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--threads", type=int, default=d["threads"], help="torch threads; 0 leaves torch's default")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--outcomes-only", action="store_true",
                   help="do not train: record the per-token outcomes of the heads already in --out on the validation "
                        "prompts (and --validation-extra), and recompute the validation calibration and the "
                        "defaults from them; heads.safetensors is left byte for byte")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]) and train; 0 on success, 2 on a bad argument."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = vars(build_parser().parse_args(argv))
    progress = not args.pop("no_progress")
    outcomes_only = args.pop("outcomes_only")
    if outcomes_only:
        given = _given(argv)
        stray = sorted(f"--{k.replace('_', '-')}" for k in given - OUTCOMES_ONLY - {"no_progress", "outcomes_only"})
        if stray:
            print(f"adadecode train-heads: error: {', '.join(stray)}: training options; --outcomes-only keeps the "
                  "heads in --out as they are (leave them out)", file=sys.stderr)
            return 2
        # left out: what the manifest records (recompute_outcomes), not train_heads' defaults
        args = {k: v for k, v in args.items() if k in OUTCOMES_ONLY and (k in given or k not in _MANIFESTS)}
    try:
        if outcomes_only:
            recompute_outcomes(**args, progress=progress, argv=argv)
        else:
            train_heads(**args, progress=progress, argv=argv)
    except PlacementError as e:
        print(f"adadecode train-heads: error: {_as_flags(str(e))}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"adadecode train-heads: error: {e}", file=sys.stderr)
        return 2
    return 0


def _given(argv: Sequence[str]) -> set[str]:
    """The options ``argv`` sets (by their dest), whatever their values."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def _as_flags(message: str) -> str:
    """runtime/device.py words its errors for the run config (model.device, --model.device=cpu);
    say them with this command's flags."""
    for config, flag in (("--model.device=", "--device "), ("--model.dtype=", "--dtype "),
                         ("model.device", "--device"), ("model.dtype", "--dtype")):
        message = message.replace(config, flag)
    return message


def _vocab_size(value: str) -> str:
    if value != "full" and not (value.isdigit() and int(value) > 0):
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer or `full`")
    return value


if __name__ == "__main__":
    sys.exit(main())
