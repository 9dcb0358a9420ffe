"""A model's ``generation_config.json``: the defaults its authors chose for decoding it.

transformers' ``generate`` and vLLM both start from this file; so does adadecode, in the
same way (``model.generation_config``, vLLM's ``--generation-config``):

- ``auto`` (the default): the model directory's ``generation_config.json``; ``none``:
  ignore it; any other value: a directory holding a ``generation_config.json``.
- **EOS ids**: its ``eos_token_id`` (one id or a list) ends generation, besides
  ``config.json``'s and the tokenizer's (Llama 3 and Gemma 3 list their end-of-turn
  tokens only here).
- **Sampling defaults**, for the fields a request (or the config) leaves unset, as vLLM
  applies them: only the keys present in the file count (vLLM's ``to_diff_dict``, not
  transformers' class defaults such as ``top_k=50``), and only when the file says
  ``do_sample: true``. transformers ignores ``temperature``, ``top_p`` and ``top_k`` without
  ``do_sample`` (and warns that such a file is inconsistent); vLLM would sample at that
  temperature. adadecode keeps greedy decoding there, the parity reference, and samples
  where the model's own ``generate`` would. With ``do_sample: true`` and no
  ``temperature``, the temperature is 1.0 (transformers' default, and vLLM's).
- Keys it cannot honour (``repetition_penalty``, ``typical_p``, ...) are named in
  ``ignored``, so that the caller can say so once.

No torch and no transformers here: the file is read as JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .params import SamplingParams

GENERATION_CONFIG_FILE = "generation_config.json"
# file key -> SamplingParams field; min_p is transformers' name too
_SAMPLING_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p"}
# keys that change the tokens but that adadecode does not implement; neutral values are not mentioned
_UNSUPPORTED_NEUTRAL: dict[str, float | None] = {
    "repetition_penalty": 1.0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "no_repeat_ngram_size": 0,
    "encoder_repetition_penalty": 1.0,
    "num_beams": 1,
    "length_penalty": 1.0,
    "top_h": None,
}


class GenerationConfigError(ValueError):
    """A generation_config.json (or the setting naming one) that cannot be used; the message says why."""


@dataclass(frozen=True)
class GenerationDefaults:
    """What a model's generation config contributes: EOS ids and sampling defaults."""

    path: Path | None = None  # the file read; None: none (``none``, or the model has none)
    eos_token_ids: frozenset[int] = frozenset()
    sampling: dict[str, float | int] = field(default_factory=dict)  # SamplingParams fields; empty: greedy
    ignored: tuple[str, ...] = ()  # keys set in the file that adadecode does not implement


def generation_config_path(model_dir: str | Path, setting: str = "auto") -> Path | None:
    """The ``generation_config.json`` that ``setting`` names for the model in ``model_dir``, or None."""
    if setting == "none":
        return None
    if setting == "auto":
        path = Path(model_dir) / GENERATION_CONFIG_FILE
        return path if path.is_file() else None
    folder = Path(setting).expanduser()
    path = folder if folder.name == GENERATION_CONFIG_FILE else folder / GENERATION_CONFIG_FILE
    if not path.is_file():
        raise GenerationConfigError(
            f"model.generation_config {setting!r}: {path} does not exist; give a directory holding a "
            f"{GENERATION_CONFIG_FILE}, `auto` (the model's own) or `none` (ignore it)"
        )
    return path


def read_generation_config(model_dir: str | Path, setting: str = "auto") -> GenerationDefaults:
    """The defaults of the generation config ``setting`` names (see the module docstring)."""
    path = generation_config_path(model_dir, setting)
    if path is None:
        return GenerationDefaults()
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise GenerationConfigError(f"{path} is not valid JSON ({e}); fix it, or pass --generation-config none") from e
    if not isinstance(data, dict):
        raise GenerationConfigError(f"{path} must hold a JSON object; fix it, or pass --generation-config none")
    sampling: dict[str, float | int] = {}
    if data.get("do_sample") is True:
        sampling = {ours: data[key] for key, ours in _SAMPLING_KEYS.items() if data.get(key) is not None}
        sampling.setdefault("temperature", 1.0)
        try:
            checked: dict[str, Any] = dict(sampling)
            SamplingParams(**checked)  # the bounds every request is held to
        except ValueError as e:
            raise GenerationConfigError(
                f"{path}: {e}; override it (e.g. --temperature), or pass --generation-config none"
            ) from None
    ignored = tuple(
        f"{key}={data[key]!r}"
        for key, neutral in _UNSUPPORTED_NEUTRAL.items()
        if data.get(key) is not None and not _same(data[key], neutral)
    )
    return GenerationDefaults(path, _ids(data.get("eos_token_id"), path), sampling, ignored)


def _same(value: object, neutral: float | None) -> bool:
    return isinstance(value, (int, float)) and neutral is not None and math.isclose(value, neutral)


def _ids(value: object, path: Path) -> frozenset[int]:
    if value is None:
        return frozenset()
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
        raise GenerationConfigError(
            f"{path}: eos_token_id {value!r} is not a token id or a list of them; fix "
            "it, or pass --generation-config none"
        )
    return frozenset(items)
