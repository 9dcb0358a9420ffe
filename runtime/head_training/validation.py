"""The validation prompts: every ``val_every``-th prompt of the train file (never trained on)
and, added to them, every prompt of the ``--validation-extra`` files (never trained on either).

The heads' per-token outcomes (``outcomes.safetensors``) and the default choice are made on
them. The train file's validation prompts come first, then each extra file's in the order
given, so the outcomes' tokens can be told apart by the per-file token counts the manifest
records (``record``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path


def split_prompts(prompts: list, every: int) -> tuple[list, list]:
    """(train, validation) prompts of one file: every ``every``-th prompt validates. The one rule,
    for training and for ``--outcomes-only``."""
    is_val = [(i + 1) % every == 0 for i in range(len(prompts))]
    return [p for p, v in zip(prompts, is_val) if not v], [p for p, v in zip(prompts, is_val) if v]


def extra_files(values: str | Iterable[str] | None) -> list[str]:
    """``--validation-extra`` values (each a file or a comma list) as a list of files, in order,
    without repeats; "none" (alone) means no extra file."""
    if values is None:
        return []
    values = [values] if isinstance(values, str) else list(values)
    files = [f.strip() for v in values for f in v.split(",") if f.strip()]
    if files == ["none"]:
        return []
    if "none" in files:
        raise ValueError("--validation-extra none means no extra validation file; do not combine it with files")
    return list(dict.fromkeys(files))


@dataclass(frozen=True)
class Validation:
    """The validation prompts, by the file each comes from."""

    train_file: str
    every: int
    files: tuple[str, ...]  # train_file, then the extra files
    parts: tuple[list, ...]  # the prompts taken from each of ``files``

    @classmethod
    def read(cls, train_file: str, train_prompts: list, every: int, extra: Sequence[str]) -> Validation:
        """``train_prompts`` (``train_file``'s) by the rule of ``split_prompts``, plus every prompt
        of each ``extra`` file (read now: a bad file is refused before any model loads)."""
        from ..prompts import read_prompts

        _, val = split_prompts(train_prompts, every)
        return cls(train_file, every, (train_file, *extra), (val, *(read_prompts(f) for f in extra)))

    @property
    def extra(self) -> tuple[str, ...]:
        return self.files[1:]

    @property
    def prompts(self) -> list:
        return [p for part in self.parts for p in part]

    @property
    def label(self) -> str:
        """What the validation split's ``file`` says: the train file, and the extra files if any."""
        return " + ".join(self.files)

    def describe(self) -> str:
        """The prompts in words, for the manifest's notes."""
        text = f"every {self.every}-th prompt of {self.train_file}, never trained on"
        return text + "".join(f", and all of {f}" for f in self.extra)

    def record(self, tokens_per_prompt: Sequence[int]) -> dict:
        """The manifest's ``training.data.validation``: the train file (``file``, ``sha256``, as
        before extra files existed), the totals over all validation prompts (those the outcomes
        hold), and per file in the outcomes' order its prompts and generated tokens."""
        if len(tokens_per_prompt) != sum(map(len, self.parts)):
            raise ValueError(f"{len(tokens_per_prompt)} token counts for {sum(map(len, self.parts))} prompts")
        files, at = [], 0
        for i, (file, part) in enumerate(zip(self.files, self.parts)):
            n = sum(tokens_per_prompt[at : at + len(part)])
            at += len(part)
            select = f"every {self.every}-th prompt" if i == 0 else "all"
            files.append({"file": file, "sha256": sha256(file), "select": select, "prompts": len(part),
                          "tokens": int(n)})
        return {"file": self.train_file, "sha256": files[0]["sha256"], "prompts": len(tokens_per_prompt),
                "tokens": int(sum(tokens_per_prompt)), "files": files}


def sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
