"""Exit heads: early next-token predictions from an intermediate layer.

The head at layer ``l`` reads the hidden state entering layer ``l`` (the output
of layers ``0..l-1``) and computes ``lm_head(final_norm(f_l(h)))`` with the base
model's own frozen final norm and LM head and a learned ``f_l`` (trained by
``adadecode train-heads``) of one of two types (``HEAD_TYPES``, ``head_transform``):

- ``linear``, the paper's: ``f(h) = T h``, a ``d x d`` matrix (identity at start);
- ``mlp``: ``f(h) = T h + W2 silu(W1 rmsnorm(h; g))`` with a small hidden size
  (``W2`` zero at start, so it starts as the linear head). It exits more tokens
  at the same precision (docs/results.md) for about 1.6x a linear head's time.

Its confidence is the top softmax probability; a Stage emits the token when the
confidence exceeds the head's threshold.

Why a restricted vocabulary: the tied LM head of the bundled model is about a
fifth of its weights, so a full head evaluation costs about a fifth of a token.
A head may instead keep only the ``K`` LM-head rows of the tokens that cover
most of the model's own greedy outputs (``vocab_ids`` in the heads file), a
contiguous copy of a few MB. Its softmax runs over those ``K`` tokens only, so
its confidence over-estimates the full one; the thresholds are calibrated with
the restricted head, since that is what runs. A wrong early token is only ever
rolled back, so the approximation costs speed, never correctness.

Sampling (runtime/sampling.py). A sampled sequence's head processes its logits
as the final layer does (temperature, top-k, top-p, min-p) and draws with the
same seeded noise, each of its ``K`` tokens taking the noise entry of its
full-vocabulary id. Its distribution ``q`` is over its ``K`` tokens: every
token outside them has ``q = 0``, which speculative acceptance accounts for
(they are reached through the residual ``max(0, p - q)``).

On disk (a directory): ``heads.safetensors`` holds ``T.<layer>`` ([D, D]), for
MLP heads also ``W1.<layer>`` ([H, D]), ``W2.<layer>`` ([D, H]) and ``g.<layer>``
([D]), and for a restricted head ``vocab_ids`` ([K], int32); ``manifest.json``
records ``head_type`` (absent: linear, as in heads written before MLP heads) and
``mlp_hidden`` H, the base model's fingerprint, the default layers and
thresholds, the training command and data, the calibration table, and the size
and sha256 of ``heads.safetensors``. Both files are replaced atomically, the
manifest last (runtime/atomic_io.py), and the tensors are checked against its checksum on load:
an interrupted rerun of ``train-heads`` leaves the old pair, or a pair that is
refused by name, never tensors that half load. Heads for another base model are
refused too; a manifest of an older version, without the checksum, still loads.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from . import atomic_io, sampling
from .hf_adapter import rms_norm, softcap

FORMAT = "adadecode-exit-heads"
FORMAT_VERSION = 1
HEADS_FILE = "heads.safetensors"
OUTCOMES_FILE = "outcomes.safetensors"  # per validation token: each head's confidence and whether it was right
MANIFEST_FILE = "manifest.json"
# each type's tensors, stored as ``<name>.<layer>``
HEAD_TENSORS = {"linear": ("T",), "mlp": ("T", "W1", "W2", "g")}
HEAD_TYPES = tuple(HEAD_TENSORS)


def head_transform(head: Mapping[str, torch.Tensor], hidden: torch.Tensor, eps: float) -> torch.Tensor:
    """``f(h)``, before the final norm: ``T h``, plus ``W2 silu(W1 rmsnorm(h; g))`` for an MLP
    head (one that has ``W1``). The one definition of the math: the runtime, ``train-heads`` and
    the head families (head_training/families.py) all call it; differentiable.

    # T: [D, D]; W1: [H, D]; W2: [D, H]; g: [D]; hidden: [N, D] or [D] -> the same shape
    """
    out = F.linear(hidden, head["T"])
    if "W1" in head:
        # the norm in float32, as the model's own (hf_adapter.rms_norm): bfloat16 heads would drift
        x = hidden.float()
        x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(hidden.dtype) * head["g"]
        out = out + F.linear(F.silu(F.linear(x, head["W1"])), head["W2"])
    return out


def head_logits(head: Mapping[str, torch.Tensor], hidden: torch.Tensor, norm: nn.Module,
                weight: torch.Tensor) -> torch.Tensor:
    """``weight @ final_norm(f(h))`` for each row (``head``: one layer's tensors, see
    ``head_transform``; its own norm takes the final norm's eps); differentiable.

    # hidden: [N, D] or [D]; weight: [K, D] -> [N, K] or [K]
    """
    return F.linear(rms_norm(head_transform(head, hidden, norm.variance_epsilon), norm), weight)


class ExitHeads:
    """Trained heads for one base model; ``layers`` are the active ones (see ``select``)."""

    def __init__(
        self,
        params: Mapping[int, torch.Tensor | Mapping[str, torch.Tensor]],
        norm: nn.Module,
        weight: torch.Tensor,
        vocab_ids: torch.Tensor | None,
        thresholds: Mapping[int, float],
        manifest: dict,
        layers: Iterable[int] | None = None,
        logit_softcap: float | None = None,
    ):
        """``params``: per layer, the head's tensors by name (``HEAD_TENSORS``), or a bare [D, D]
        tensor: a linear head's ``T``. ``weight``: the LM-head rows the heads score ([K, D]:
        restricted, or the full head when ``vocab_ids`` is None); ``thresholds``: a threshold for
        every layer in ``params``; ``logit_softcap``: the model's ``final_logit_softcapping``
        (Gemma), applied to the heads' logits as to the final layer's."""
        self.params: dict[int, dict[str, torch.Tensor]] = {
            l: {"T": p} if isinstance(p, torch.Tensor) else dict(p) for l, p in params.items()
        }
        self.norm = norm
        self.weight = weight
        self.logit_softcap = logit_softcap
        self.vocab_ids = vocab_ids
        self._vocab_list = vocab_ids.tolist() if vocab_ids is not None else None
        self._vocab_cpu = vocab_ids.cpu() if vocab_ids is not None else None  # ids for the host-side noise
        self.manifest = manifest
        self.available_layers: tuple[int, ...] = tuple(sorted(self.params))
        self.layers: tuple[int, ...] = tuple(sorted(self.params if layers is None else layers))
        self.thresholds: dict[int, float] = {l: float(thresholds[l]) for l in self.layers}

    @property
    def default_layers(self) -> tuple[int, ...]:
        return tuple(self.manifest["default_layers"])

    @property
    def vocab_size(self) -> int:
        """Tokens a head can predict: K for a restricted head, the full vocabulary otherwise."""
        return self.weight.shape[0]

    def _logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The head at ``layer``, in float32 (the softmax of every caller runs in float32).
        # hidden: [D] or [N, D] -> [K] or [N, K]"""
        logits = head_logits(self.params[layer], hidden.to(self.weight.dtype), self.norm, self.weight)
        return softcap(logits, self.logit_softcap).float()

    @torch.inference_mode()
    def predict(self, layer: int, hidden: torch.Tensor) -> tuple[int, float]:
        """The head at ``layer`` on one position: (token id in the full vocabulary, confidence).

        One device-to-host transfer (``to_host``) carries both values.

        # hidden: [D]
        """
        from .model_runner import to_host

        logits = self._logits(layer, hidden)
        top, index = logits.max(dim=0)
        # top softmax probability = 1 / sum(exp(logits - max)): no [K] division, no second max
        confidence = 1.0 / torch.exp(logits - top).sum()
        confidence, index = to_host(torch.stack([confidence.double(), index.double()]))  # float64: exact ids
        index = int(index)
        return (self._vocab_list[index] if self._vocab_list is not None else index), confidence

    @torch.inference_mode()
    def propose(self, layer: int, hidden: torch.Tensor, params, pos: int):
        """The head at ``layer`` sampling the token at position ``pos`` under ``params`` (a
        ``SamplingParams``): (token id in the full vocabulary, confidence: the top probability of
        the head's processed distribution q, and in speculative mode the ``Proposal``, else None).

        # hidden: [D]
        """
        logits = self._logits(layer, hidden)
        return sampling.propose(logits, self._vocab_cpu, params, pos)

    @torch.inference_mode()
    def predict_batch(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``predict`` on many positions, for calibration. # hidden: [N, D] -> ids [N], confidence [N]"""
        # the softmax in float32, as in predict: bfloat16 heads would otherwise calibrate on rounded confidences
        logits = self._logits(layer, hidden)
        probs = torch.softmax(logits, dim=-1)
        confidence, index = probs.max(dim=-1)
        ids = self.vocab_ids[index].long() if self.vocab_ids is not None else index
        return ids, confidence

    def select(
        self, layers: Iterable[int] | None = None, thresholds: float | Mapping[int, float] | None = None
    ) -> ExitHeads:
        """The heads at ``layers`` (None: the manifest's default layers) with ``thresholds``
        (None: the manifest's defaults; a float: the same for all; a dict: per layer, the
        others keep their defaults). Shares the tensors; ``self`` is unchanged."""
        layers = self.default_layers if layers is None else tuple(sorted(set(int(l) for l in layers)))
        missing = [l for l in layers if l not in self.params]
        if missing:
            raise ValueError(
                f"no exit head at layer(s) {missing}; these heads exist at layers {list(self.available_layers)} "
                f"(train others with `adadecode train-heads --layers ...`)"
            )
        chosen = {l: float(self.manifest["default_thresholds"][str(l)]) for l in layers}
        if isinstance(thresholds, Mapping):
            unknown = sorted(set(int(l) for l in thresholds) - set(layers))
            if unknown:
                raise ValueError(
                    f"thresholds given for layer(s) {unknown}, which are not among the selected {list(layers)}"
                )
            chosen.update({int(l): float(t) for l, t in thresholds.items()})
        elif thresholds is not None:
            chosen = {l: float(thresholds) for l in layers}
        for l, t in chosen.items():
            if not (0.0 <= t < 1.0) or math.isnan(t):
                raise ValueError(f"threshold {t} for the head at layer {l} is outside [0, 1)")
        return ExitHeads(self.params, self.norm, self.weight, self.vocab_ids, chosen, self.manifest, layers,
                         self.logit_softcap)

    def __repr__(self) -> str:
        th = ", ".join(f"{l}: {self.thresholds[l]:g}" for l in self.layers)
        return f"ExitHeads(layers={list(self.layers)}, thresholds={{{th}}}, vocab={self.vocab_size})"


def bundled_heads_path(name: str = "smollm2-135m-instruct") -> Path:
    """Directory of the heads shipped for bundled model ``name`` inside the installed package
    (it may not exist: check before use)."""
    return Path(__file__).resolve().parent / "assets" / "heads" / name


def read_manifest(path: str | Path) -> dict:
    """The manifest of the heads directory ``path``, checked for its format and for the keys the
    loaders read (``ValueError`` naming the file otherwise, never a ``KeyError`` later)."""
    file = Path(path) / MANIFEST_FILE
    try:
        manifest = json.loads(file.read_text())
    except OSError as e:
        raise ValueError(
            f"exit heads {path}: cannot read {MANIFEST_FILE} ({e.strerror}); point at the directory "
            f"`adadecode train-heads --out DIR` wrote"
        ) from e
    except ValueError as e:  # also a UnicodeDecodeError: a garbled file
        raise ValueError(f"exit heads {file} is not valid JSON ({e}); {_rewrite_hint(path)}") from e
    if not isinstance(manifest, dict):
        # ValueError, not TypeError: a user error, reported in one line (launcher/errors.py)
        raise ValueError(f"exit heads {file} is not a JSON object; {_rewrite_hint(path)}")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{file} is not an exit-heads manifest of format {FORMAT} v{FORMAT_VERSION} (found "
            f"{manifest.get('format')!r} v{manifest.get('format_version')!r}); retrain with `adadecode train-heads`"
        )
    head_type = manifest.get("head_type", "linear")  # absent: written before MLP heads, all linear
    if head_type not in HEAD_TYPES:
        raise ValueError(
            f"exit heads {file}: head type {head_type!r} is not one this version of adadecode runs "
            f"({', '.join(HEAD_TYPES)}); retrain them with `adadecode train-heads --head-type linear` (or mlp), "
            f"or use the adadecode version that wrote them"
        )
    bad = _malformed_keys(manifest)
    if bad:
        raise ValueError(f"exit heads {file}: missing or malformed {', '.join(bad)}; {_rewrite_hint(path)}")
    return manifest


def _malformed_keys(manifest: dict) -> list[str]:
    """The keys that loading and the head choice read (runtime/loading.py, auto_heads.py) that are
    absent or of the wrong type: a damaged manifest is named here, not met as a KeyError later."""
    base, files = manifest.get("base_model"), manifest.get("files", {})
    checks = {
        "base_model.fingerprint": isinstance(base, dict) and isinstance(base.get("fingerprint"), str),
        "default_layers": isinstance(manifest.get("default_layers"), list)
        and all(_is_int(l) for l in manifest["default_layers"]),
        "default_thresholds": _is_layer_map(manifest.get("default_thresholds"), _is_number),
        "files": isinstance(files, dict) and _is_file_record(files.get(HEADS_FILE)),
        "validation_calibration": _is_calibration(manifest.get("validation_calibration")),
        "calibration": _is_calibration(manifest.get("calibration")),
        # the shapes of an MLP head's tensors follow from it (load_exit_heads checks them)
        "mlp_hidden": manifest.get("head_type") != "mlp"
        or (_is_int(manifest.get("mlp_hidden")) and manifest["mlp_hidden"] > 0),
    }
    return [key for key, ok in checks.items() if not ok]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_layer_map(x, is_value) -> bool:
    """``{"<layer>": value}``, as JSON keys layers."""
    return isinstance(x, dict) and all(isinstance(k, str) and k.isdigit() and is_value(v) for k, v in x.items())


def _is_file_record(record) -> bool:
    """None (a manifest written before checksums) or ``{"bytes": N, "sha256": HEX}``."""
    return record is None or (isinstance(record, dict) and _is_int(record.get("bytes"))
                              and isinstance(record.get("sha256"), str))


def _is_calibration(table) -> bool:
    """None (heads without one) or ``{"heads": {"<layer>": {"sweep": [{threshold, exit_rate, precision}]}}}``
    (precision null where nothing exited)."""
    def is_row(r) -> bool:
        return (isinstance(r, dict) and _is_number(r.get("threshold")) and _is_number(r.get("exit_rate"))
                and (r.get("precision") is None or _is_number(r["precision"])) and "precision" in r)

    def is_head(h) -> bool:
        return isinstance(h, dict) and isinstance(h.get("sweep"), list) and all(map(is_row, h["sweep"]))

    return not table or (isinstance(table, dict) and _is_layer_map(table.get("heads"), is_head))


def _rewrite_hint(path: str | Path) -> str:
    """What to do about a damaged heads directory: write it again."""
    hint = f"rerun `adadecode train-heads --out {path}` (with the --model they are for) to write it again"
    if Path(path).resolve() == bundled_heads_path().resolve():
        hint += ", or reinstall adadecode, which ships these heads"
    return hint


def save_exit_heads(
    path: str | Path,
    params: Mapping[int, torch.Tensor | Mapping[str, torch.Tensor]],
    vocab_ids: torch.Tensor | None,
    manifest: dict,
    dtype: torch.dtype = torch.float16,
    outcomes: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``heads.safetensors`` (``params`` as ``ExitHeads`` takes them, each tensor as
    ``<name>.<layer>`` in ``dtype``; ``manifest`` names their ``head_type`` and, for MLP heads,
    ``mlp_hidden``), ``outcomes.safetensors`` when given
    (per validation token, each head's confidence and whether it agreed with the final layer:
    what the head choice counts exits on, runtime/sim/heads.py) and then ``manifest.json``, with
    the files' checksums, into ``path``; each replaces its old version atomically (module
    docstring). Raises ValueError naming ``path`` when the disk refuses (full, read-only, no permission)."""
    path = Path(path)
    tensors = {
        f"{name}.{l}": t.detach().to(dtype).contiguous()
        for l, p in params.items() for name, t in ({"T": p} if isinstance(p, torch.Tensor) else p).items()
    }
    if vocab_ids is not None:
        tensors["vocab_ids"] = vocab_ids.to(torch.int32).contiguous()
    files = {HEADS_FILE: tensors, OUTCOMES_FILE: outcomes} if outcomes else {HEADS_FILE: tensors}
    try:
        path.mkdir(parents=True, exist_ok=True)
        _write_files(path, files, {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest})
    except (OSError, SafetensorError) as e:  # safetensors reports its I/O failures as SafetensorError
        raise ValueError(f"cannot write exit heads into {path} ({e}); free space or fix permissions there, "
                         f"or choose another --out") from e
    return path


def save_outcomes(path: str | Path, outcomes: Mapping[str, torch.Tensor], manifest: dict,
                  heads_record: dict) -> None:
    """Write ``outcomes.safetensors`` and then ``manifest`` (which vouches for it), as
    ``save_exit_heads`` does, leaving ``heads.safetensors`` as it is (``heads_record``: its
    checksum). Raises ValueError naming ``path`` when the disk refuses."""
    path = Path(path)
    kept = {**(manifest.get("files") or {}), HEADS_FILE: heads_record}
    try:
        _write_files(path, {OUTCOMES_FILE: outcomes}, manifest, kept)
    except (OSError, SafetensorError) as e:
        raise ValueError(f"cannot write the outcomes into {path} ({e}); free space or fix permissions there") from e


def file_record(file: Path) -> dict:
    """A file's entry in the manifest's ``files``: its size and checksum."""
    return {"bytes": file.stat().st_size, "sha256": atomic_io.sha256_file(file)}


def _write_files(path: Path, files: Mapping[str, Mapping[str, torch.Tensor]], manifest: dict,
                 kept: Mapping[str, dict] | None = None) -> None:
    """Each of ``files`` (name -> tensors) replaced atomically, then ``manifest`` with every file's
    checksum in ``files`` (``kept``: the records of files left as they are)."""
    from safetensors.torch import save_file

    records = dict(kept or {})
    for name, content in files.items():
        with atomic_io.replacing(path / name, mode=0o644) as tmp:  # 0o644: heads are meant to be shared
            save_file({k: v.contiguous() for k, v in content.items()}, str(tmp), metadata={"format": FORMAT})
            records[name] = file_record(tmp)
    manifest["files"] = records
    atomic_io.write_text(path / MANIFEST_FILE, _dumps(manifest) + "\n", mode=0o644)


def _dumps(obj) -> str:
    """Indented JSON with every innermost list or object on one line (a calibration row per line).
    JSON strings never hold a raw newline, so only layout whitespace is removed."""
    text = json.dumps(obj, indent=1)
    return re.sub(r"[\[{][^\[\]{}]*[\]}]", lambda m: re.sub(r"\n\s*", " ", m.group(0)), text)


def load_exit_heads(
    path: str | Path,
    *,
    fingerprint: str,
    config,
    norm: nn.Module,
    lm_head_weight: torch.Tensor,
) -> ExitHeads:
    """Load the heads in ``path`` for the base model with ``fingerprint`` (from
    ``resolve_model(...).fingerprint``), its HF ``config``, final ``norm`` and LM head weight.

    Returns the manifest's default selection; ``.select()`` picks other trained layers or
    thresholds. Raises ValueError, with the fix, for heads made for another model.
    """
    path = Path(path)
    manifest = read_manifest(path)
    base = manifest["base_model"]
    if base["fingerprint"] != fingerprint:
        raise ValueError(
            f"exit heads {path} were trained for another base model ({base.get('origin')}, fingerprint "
            f"{base['fingerprint']}); the loaded model has fingerprint {fingerprint}. Train heads for this "
            f"model with `adadecode train-heads --model SOURCE --out DIR` and set decoding.heads=DIR, "
            f"or run without heads (decoding.heads=none)"
        )
    hidden, vocab, num_layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    expected = {"hidden_size": hidden, "vocab_size": vocab, "num_layers": num_layers}
    for key, value in expected.items():
        if base.get(key) != value:
            raise ValueError(
                f"exit heads {path} were trained for a model with {key} {base.get(key)}, but the loaded "
                f"model has {value}; retrain them with `adadecode train-heads` for this model"
            )
    if tuple(lm_head_weight.shape) != (vocab, hidden):
        raise ValueError(f"LM head weight has shape {tuple(lm_head_weight.shape)}, expected ({vocab}, {hidden})")
    tensors = _read_heads_file(path, manifest)
    params = {l: {name: t.to(device=lm_head_weight.device, dtype=lm_head_weight.dtype).contiguous()
                  for name, t in p.items()}
              for l, p in _head_params(path, manifest, tensors, num_layers, hidden).items()}
    vocab_ids = tensors.get("vocab_ids")
    if vocab_ids is not None:
        vocab_ids = vocab_ids.long().to(lm_head_weight.device)
        if vocab_ids.numel() == 0 or int(vocab_ids.min()) < 0 or int(vocab_ids.max()) >= vocab:
            raise ValueError(f"exit heads {path}: vocab_ids fall outside the model's vocabulary of {vocab}")
        # a contiguous copy of K rows: the restricted head reads K*D floats, not V*D
        weight = lm_head_weight.detach()[vocab_ids].contiguous()
    else:
        weight = lm_head_weight.detach()
    thresholds = {int(l): float(t) for l, t in manifest["default_thresholds"].items()}
    missing = [l for l in params if l not in thresholds]
    if missing or set(manifest["default_layers"]) - set(params):
        raise ValueError(f"exit heads {path}: the manifest's default layers/thresholds do not match the "
                         f"heads in {HEADS_FILE} (layers {sorted(params)})")
    heads = ExitHeads(params, norm, weight, vocab_ids, thresholds, manifest,
                      logit_softcap=getattr(config, "final_logit_softcapping", None))
    return heads.select()


def _head_params(path: Path, manifest: dict, tensors: Mapping[str, torch.Tensor], num_layers: int,
                 hidden: int) -> dict[int, dict[str, torch.Tensor]]:
    """Per layer, the tensors of the manifest's head type, each checked for its shape; ValueError
    for a tensor of another name or shape, or a head missing one (a pair that does not belong
    together, or a damaged file)."""
    head_type = manifest.get("head_type", "linear")  # read_manifest checked it
    h = manifest.get("mlp_hidden")
    shapes = {"T": (hidden, hidden), "W1": (h, hidden), "W2": (hidden, h), "g": (hidden,)}
    names = HEAD_TENSORS[head_type]
    what = f"a {num_layers}-layer model of hidden size {hidden}" + (f" with MLP heads of hidden size {h}"
                                                                    if head_type == "mlp" else "")
    params: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key == "vocab_ids":
            continue
        name, _, layer = key.partition(".")
        if name not in names or not layer.isdigit():
            expected = ", ".join(f"{n}.<layer>" for n in names)
            raise ValueError(f"exit heads {path / HEADS_FILE}: tensor {key!r} is not one of {head_type} heads "
                             f"({expected}, as {MANIFEST_FILE} says) or vocab_ids; {_rewrite_hint(path)}")
        if tuple(t.shape) != shapes[name] or not 0 < int(layer) < num_layers:
            raise ValueError(f"exit heads {path}: tensor {key} of shape {tuple(t.shape)} does not fit {what} "
                             f"(expected {shapes[name]}, layers 1..{num_layers - 1}); {_rewrite_hint(path)}")
        params.setdefault(int(layer), {})[name] = t
    incomplete = sorted(f"{n}.{l}" for l, p in params.items() for n in names if n not in p)
    if incomplete:
        raise ValueError(f"exit heads {path / HEADS_FILE}: {head_type} heads lack {', '.join(incomplete)}; "
                         f"{_rewrite_hint(path)}")
    return params


def read_all_outcomes(
    path: str | Path, manifest: dict
) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]] | None, tuple[torch.Tensor, torch.Tensor] | None]:
    """``outcomes.safetensors`` read once (checked against its checksum): ``(read_outcomes,
    read_lookup_outcomes)``, each None where the file, or its part, is not there."""
    if OUTCOMES_FILE not in manifest.get("files", {}):
        return None, None
    tensors = _read_heads_file(Path(path), manifest, OUTCOMES_FILE)
    layers = sorted(int(k.rsplit(".", 1)[1]) for k in tensors if k.startswith("confidence."))
    heads = {l: (tensors[f"confidence.{l}"].float(), tensors[f"agrees.{l}"].bool()) for l in layers}
    lookup = (tensors["lookup.match"].long(), tensors["lookup.agrees"].bool()) if "lookup.match" in tensors else None
    return heads, lookup


def read_outcomes(path: str | Path, manifest: dict) -> dict[int, tuple[torch.Tensor, torch.Tensor]] | None:
    """Per head layer: (confidence [N] float32, agreed with the final layer [N] bool) of every
    validation token, from ``outcomes.safetensors``; None for heads trained without it."""
    return read_all_outcomes(path, manifest)[0]


def read_lookup_outcomes(path: str | Path, manifest: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The context lookup on the same validation tokens (runtime/context_lookup.py): the length of
    the longest match before each token [N] int64 (0: none) and whether its guess was the token [N]
    bool; None for heads whose outcomes do not record it."""
    return read_all_outcomes(path, manifest)[1]


def _read_heads_file(path: Path, manifest: dict, name: str = HEADS_FILE) -> dict[str, torch.Tensor]:
    """The tensors of ``path/name``, first checked against the manifest's size and sha256 where
    it records them (a manifest of an older version does not: safetensors' own header check is
    then what catches a truncated file)."""
    from safetensors.torch import load_file

    file = path / name
    record = manifest.get("files", {}).get(name)
    try:
        if record is not None:
            size = file.stat().st_size
            if size != record["bytes"] or atomic_io.sha256_file(file) != record["sha256"]:
                found = f"{size} bytes" if size != record["bytes"] else "another sha256"
                raise ValueError(
                    f"exit heads {file} do not match {path / MANIFEST_FILE} ({found}; expected {record['bytes']} "
                    f"bytes, sha256 {record['sha256'][:12]}...): damaged, or left by an interrupted write; "
                    f"{_rewrite_hint(path)}")
        return load_file(str(file))
    except (OSError, SafetensorError) as e:
        raise ValueError(f"exit heads {file} cannot be read ({e}); {_rewrite_hint(path)}") from e
