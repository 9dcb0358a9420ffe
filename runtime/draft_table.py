"""The draft table: what the model itself said next, after the same few tokens, in other answers.

The context lookup (runtime/context_lookup.py) drafts only where the sequence repeats itself;
about a third of a greedy answer's positions have no earlier match at all. A small model's
answers share phrasing across prompts ("Here is a Python function that", "```python\\ndef"),
so a table of the model's own greedy answers to many prompts names the next token at many of
those positions too (retrieval-based speculative decoding, REST, with the model's own outputs
as the datastore). Drafts are verified by the final layer like every other draft, so the
table changes speed, never output.

``DraftTable`` maps every n-gram of 1 to ``max_len`` tokens of the answers to the token that
followed it most often. ``match`` returns the continuation of the longest suffix it holds.
A table is built once per model (``adadecode build-draft-table``, launcher/draft_table.py) and
stored as one safetensors file whose metadata names the model it was built for.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from . import atomic_io

FORMAT = "adadecode-draft-table"
FORMAT_VERSION = "1"
TABLE_FILE = "draft_table.safetensors"
MAX_LEN = 4  # the longest n-gram kept: 6 drafted no better (docs/results.md, The draft table)


class DraftTable:
    def __init__(self, entries: dict[tuple[int, ...], int], max_len: int = MAX_LEN, meta: dict | None = None):
        self.entries = entries
        self.max_len = max_len
        self.meta = meta or {}

    @classmethod
    def build(cls, sequences: Iterable[Sequence[int]], max_len: int = MAX_LEN, starts: Iterable[int] | None = None,
              meta: dict | None = None) -> DraftTable:
        """The table of ``sequences`` (each a prompt and the model's answer); ``starts``: per sequence,
        the index of its first answer token (default 0): n-grams are kept only where an answer token
        follows them, since the table stands for what the model says, not what its users write.
        An n-gram whose continuation its shorter suffix already gives is left out: ``match`` finds
        the same token through the suffix."""
        counts: dict[tuple[int, ...], Counter[int]] = {}
        starts = iter(starts) if starts is not None else None
        for seq in sequences:
            first = next(starts) if starts is not None else 0
            for j in range(max(first - 1, 0), len(seq) - 1):
                for k in range(1, min(max_len, j + 1) + 1):
                    counts.setdefault(tuple(seq[j - k + 1 : j + 1]), Counter())[seq[j + 1]] += 1
        best = {key: c.most_common(1)[0][0] for key, c in counts.items()}
        # every suffix of a counted n-gram was counted too, so ``match`` without ``key``'s own entry
        # finds ``best[key[1:]]``
        kept = {key: tok for key, tok in best.items() if len(key) == 1 or best[key[1:]] != tok}
        return cls(kept, max_len, meta)

    def match(self, history: Sequence[int]) -> tuple[int | None, int]:
        """The continuation of the longest suffix of ``history`` in the table and its length, or (None, 0)."""
        for k in range(min(self.max_len, len(history)), 0, -1):
            token = self.entries.get(tuple(history[-k:]))
            if token is not None:
                return token, k
        return None, 0

    def __len__(self) -> int:
        return len(self.entries)

    def save(self, path: str | Path) -> Path:
        """Write the table to ``path`` (a ``.safetensors`` file), atomically (runtime/atomic_io.py)."""
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        path = Path(path)
        keys = torch.full((len(self.entries), self.max_len), -1, dtype=torch.int32)
        tokens = torch.empty(len(self.entries), dtype=torch.int32)
        for i, (key, token) in enumerate(self.entries.items()):
            keys[i, self.max_len - len(key) :] = torch.tensor(key, dtype=torch.int32)
            tokens[i] = token
        # safetensors metadata are strings: each value as JSON
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "max_len": str(self.max_len),
                **{k: json.dumps(v) for k, v in self.meta.items()}}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_io.replacing(path, mode=0o644) as tmp:
                save_file({"keys": keys, "tokens": tokens}, str(tmp), metadata=meta)
        except (OSError, SafetensorError) as e:  # safetensors reports its I/O failures as SafetensorError
            raise ValueError(f"cannot write the draft table {path} ({e}); free space or fix permissions there, "
                             f"or choose another --out") from e
        return path


def _check_out(out: Path) -> None:
    """Refuse an ``--out`` that could not be written before the answers are generated (minutes)."""
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: a draft table is one .safetensors file; name it e.g. {TABLE_FILE}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create {out.parent} ({e.strerror}); choose another --out") from e
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ValueError(f"--out {out}: not writable here; fix permissions or choose another --out")


def bundled_table_path(name: str = "smollm2-135m-instruct") -> Path:
    return Path(__file__).parent / "assets" / "draft_tables" / name / TABLE_FILE


def load_draft_table(path: str | Path, *, fingerprint: str, vocab_size: int) -> DraftTable:
    """The table in ``path`` for the model with ``fingerprint`` and ``vocab_size``. Raises ValueError,
    naming the fix, for a file that is not a draft table or was built for another model."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    rebuild = f"build one with `adadecode build-draft-table --model SOURCE --out {path}`"
    if not path.is_file():
        what = "is a directory, not a .safetensors file" if path.is_dir() else "does not exist"
        raise ValueError(f"draft table {path} {what}; {rebuild}, or set decoding.draft_table=none")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"{path} is not a draft table of format {FORMAT} v{FORMAT_VERSION} (found "
                                 f"{meta.get('format')!r} v{meta.get('format_version')!r}); {rebuild}")
            keys, tokens = f.get_tensor("keys"), f.get_tensor("tokens")
    except (SafetensorError, OSError, KeyError) as e:
        raise ValueError(f"draft table {path} cannot be read ({e}); {rebuild}") from e
    try:
        meta = {k: v if k in ("format", "format_version") else json.loads(v) for k, v in meta.items()}
    except json.JSONDecodeError as e:
        raise ValueError(f"draft table {path}: its metadata is damaged ({e}); {rebuild}") from e
    base = meta.get("base_model")
    if not isinstance(base, dict):
        raise ValueError(f"draft table {path} names no base model; {rebuild}")
    if base.get("fingerprint") != fingerprint:
        raise ValueError(
            f"draft table {path} was built for another model ({base.get('origin')}, fingerprint "
            f"{base.get('fingerprint')}); the loaded model has fingerprint {fingerprint}. {rebuild[0].upper()}"
            f"{rebuild[1:]} for this model, or set decoding.draft_table=none")
    max_len = meta.get("max_len")
    if not isinstance(max_len, int) or not 1 <= max_len <= MAX_LEN:
        raise ValueError(f"draft table {path}: n-grams of up to {max_len} tokens; this runtime looks up 1 to "
                         f"{MAX_LEN}; {rebuild}")
    if keys.dtype != torch.int32 or tokens.dtype != torch.int32:
        raise ValueError(f"draft table {path}: keys and tokens must be int32 token ids, not {keys.dtype} and "
                         f"{tokens.dtype}; {rebuild}")
    if keys.dim() != 2 or keys.shape[1] != max_len or tokens.shape != keys.shape[:1]:
        raise ValueError(f"draft table {path}: keys of shape {tuple(keys.shape)} and tokens of shape "
                         f"{tuple(tokens.shape)} do not fit n-grams of up to {max_len} tokens; {rebuild}")
    if keys.numel() and (int(keys.max()) >= vocab_size or int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(f"draft table {path} holds token ids outside the model's vocabulary of {vocab_size}; "
                         f"{rebuild}")
    entries = {tuple(t for t in row if t >= 0): tok for row, tok in zip(keys.tolist(), tokens.tolist())}
    return DraftTable(entries, max_len, {k: v for k, v in meta.items() if k not in ("format", "format_version",
                                                                                     "max_len")})


def build_draft_table(
    out: str | Path,
    *,
    model: str = "bundled:smollm2-135m-instruct",
    prompts: str = "data/prompts/train.jsonl",
    val_every: int = 10,
    template: str = "both",
    max_new_tokens: int = 128,
    batch_size: int = 48,
    device: str = "auto",
    dtype: str = "auto",
    threads: int = 0,
    progress: bool = True,
    argv: Sequence[str] | None = None,
) -> DraftTable:
    """The model's greedy answers to ``prompts`` (minus every ``val_every``-th, the heads' validation
    prompts, never built on) as a draft table, written to ``out``. ``template``: how a text prompt is
    put to the model: ``raw`` (as `generate` without --chat), ``chat`` (the chat template, as the
    server's chat API), or ``both`` (each prompt twice); chat messages always take the template."""
    import time

    from .device import check_placement
    from .head_training.collect import collect, encode, load_base
    from .head_training.validation import split_prompts
    from .hf_adapter import load_hf_config
    from .model_source import resolve_model
    from .prompts import read_prompts

    if template not in ("raw", "chat", "both"):
        raise ValueError(f"--template {template!r}: expected raw, chat or both")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"--max-new-tokens {max_new_tokens} and --batch-size {batch_size}: expected integers >= 1")
    texts = read_prompts(prompts)
    if not 2 <= val_every:
        raise ValueError(f"--val-every {val_every}: expected at least 2 (every N-th prompt is left out)")
    train = split_prompts(texts, val_every)[0]
    _check_out(Path(out))
    dev, dt = check_placement(device, dtype, "inprocess")
    if threads > 0:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    resolved = resolve_model(model)
    config = load_hf_config(resolved.path)
    base, tokenizer, eos, pad = load_base(resolved, dev, dt, "build-draft-table")
    if not getattr(tokenizer, "chat_template", None) and (template != "raw" or any(isinstance(p, list) for p in train)):
        raise ValueError(f"the tokenizer of {resolved.origin} has no chat template: give --template raw, and "
                         f"prompts without chat messages")
    ids = []
    for p in train:  # messages take the template; a text prompt as ``template`` says
        if isinstance(p, list) or template in ("chat", "both"):
            ids.append(encode(tokenizer, p if isinstance(p, list) else [{"role": "user", "content": p}]))
        if not isinstance(p, list) and template in ("raw", "both"):
            ids.append(encode(tokenizer, p))
    items = collect(base, ids, (), max_new_tokens=max_new_tokens, batch_size=batch_size, eos=eos, pad=pad,
                    progress=progress)
    answers = [[int(t) for t in item["tokens"].tolist()] for item in items]
    meta = {
        "base_model": {"fingerprint": resolved.fingerprint, "origin": resolved.origin,
                       "vocab_size": config.vocab_size},
        "built_from": {"prompts": prompts, "val_every": val_every, "template": template,
                       "sequences": len(ids), "answer_tokens": sum(map(len, answers)),
                       "max_new_tokens": max_new_tokens, "seconds": round(time.perf_counter() - t0, 1),
                       "command": "adadecode build-draft-table " + " ".join(argv or ())},
    }
    table = DraftTable.build([p + a for p, a in zip(ids, answers)], starts=[len(p) for p in ids], meta=meta)
    table.save(out)
    return table
