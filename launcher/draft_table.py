"""`adadecode build-draft-table`: the model's own answers as a table of drafts (runtime/draft_table.py).

The table shipped for the bundled model (its exact command is in the file's metadata):

    taskset -c 1 adadecode build-draft-table --threads 1 \\
        --out runtime/assets/draft_tables/smollm2-135m-instruct/draft_table.safetensors

Another model, then decoding with its table:

    adadecode build-draft-table --model ~/models/Qwen2.5-0.5B-Instruct --out tables/qwen.safetensors
    adadecode generate --model ~/models/Qwen2.5-0.5B-Instruct --decoding.draft_table=tables/qwen.safetensors \\
        --decoding.draft=3 --early-exit eager --prompt "..."   # drafts: default only where compiled on the CPU

Data: `--prompts` minus every `--val-every`-th prompt (the exit heads' validation prompts);
data/prompts/heldout.jsonl and validation_mix.jsonl are never built on (data/prompts/README.md).
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Sequence

from adadecode.runtime.device import DTYPES, PlacementError
from adadecode.runtime.draft_table import build_draft_table

DEFAULTS = {name: p.default for name, p in inspect.signature(build_draft_table).parameters.items()}


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(prog="adadecode build-draft-table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=d["model"], help="bundled:<name>, a Hugging Face directory or a .gguf file")
    p.add_argument("--out", required=True, metavar="FILE", help="the table to write (a .safetensors file)")
    p.add_argument("--prompts", default=d["prompts"], help="prompts (JSONL) the model answers")
    p.add_argument("--val-every", type=int, default=d["val_every"], metavar="N",
                   help="leave out every N-th prompt (the exit heads' validation prompts)")
    p.add_argument("--template", choices=["raw", "chat", "both"], default=d["template"],
                   help="text prompts as given, through the chat template, or both")
    p.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"], metavar="N",
                   help="tokens of each greedy answer at most")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], metavar="N", help="prompts answered at once")
    p.add_argument("--device", default=d["device"], metavar="auto|cpu|cuda|cuda:N")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default=d["dtype"])
    p.add_argument("--threads", type=int, default=d["threads"], help="torch threads; 0 leaves torch's default")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]) and build; 0 on success, 2 on a bad argument."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = vars(build_parser().parse_args(argv))
    progress = not args.pop("no_progress")
    try:
        table = build_draft_table(**args, progress=progress, argv=argv)
    except (PlacementError, ValueError) as e:
        print(f"adadecode build-draft-table: error: {e}", file=sys.stderr)
        return 2
    built = table.meta["built_from"]
    print(f"{args['out']}: {len(table)} n-grams from {built['sequences']} answers "
          f"({built['answer_tokens']} tokens) in {built['seconds']} s")
    return 0
