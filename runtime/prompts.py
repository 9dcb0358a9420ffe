"""Prompt files: JSONL, one ``{"prompt": "..."}`` (plain text) or ``{"messages": [...]}`` (chat) per line.

``data/prompts/train.jsonl`` and ``heldout.jsonl`` (data/prompts/README.md) also carry a
``category`` (code, chat, plain text, ...), which ``select_prompts`` takes turns over.
"""

from __future__ import annotations

import json
from collections import defaultdict


def read_prompts(path: str) -> list[str | list[dict]]:
    """Prompts from a JSONL file: each line has "prompt" (text) or "messages" (chat)."""
    prompts = []
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as e:
        raise ValueError(f"cannot read prompts file {path}: {e.strerror}") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from e
        if isinstance(item, dict) and isinstance(item.get("prompt"), str):
            prompts.append(item["prompt"])
        elif isinstance(item, dict) and isinstance(item.get("messages"), list):
            prompts.append(item["messages"])
        else:
            raise ValueError(f'{path}:{n}: each line needs "prompt" (a string) or "messages" (a list)')
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def select_prompts(path: str, n: int) -> list:
    """``n`` prompts from a JSONL prompt file, taken round-robin across its categories."""
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
