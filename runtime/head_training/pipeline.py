"""``train_heads``: the pipeline of this package, step by step, and the manifest that records it."""

from __future__ import annotations

import inspect
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..context_lookup import lookup_outcomes
from ..device import check_placement, dtype_name
from ..loading import plan_stages
from ..sim.heads import HeadChoice, choose
from .calibrate import calibration_table, head_outcomes, outcome_tensors
from .collect import Split, collect, encode, load_base, make_split
from .train import train
from .validation import Validation, extra_files, sha256, split_prompts
from .vocab import DEFAULT_VOCAB_SIZE, choose_vocabulary, coverage, soft_counts

SAVE_DTYPES = ("float16", "bfloat16", "float32")


def train_heads(
    out: str | Path,
    *,
    model: str = "bundled:smollm2-135m-instruct",
    layers: str | Sequence[int] = "auto",
    prompts: str = "data/prompts/train.jsonl",
    heldout: str = "data/prompts/heldout.jsonl",
    val_every: int = 10,
    validation_extra: str | Sequence[str] | None = None,
    max_new_tokens: int = 256,
    gen_batch_size: int = 48,
    epochs: int = 4,
    lr: float = 1e-3,
    batch_size: int = 256,
    warmup: float = 0.05,
    head_type: str = "linear",
    mlp_hidden: int = 256,
    vocab_size: int | str | None = None,
    vocab_coverage: float | None = None,
    defaults_for: int = 2,
    defaults_policy: str = "eager",
    save_dtype: str = "float16",
    device: str = "auto",
    dtype: str = "auto",
    threads: int = 0,
    seed: int = 0,
    progress: bool = True,
    argv: Sequence[str] | None = None,
) -> dict:
    """Train exit heads for ``model`` and write ``heads.safetensors`` + ``manifest.json`` to ``out``.

    ``model``: bundled:<name>, a Hugging Face directory or a .gguf file. ``layers``: the candidate
    head layers, or "auto" (every L/10 layers from 0.13 L to L-2, and the first layer of every later
    stage of 2-4 ranks). ``prompts`` minus every
    ``val_every``-th prompt trains; those validation prompts, and all of the ``validation_extra``
    files (one, several or a comma list; default none), give the per-token outcomes and choose the
    defaults; ``heldout`` is only evaluated. ``head_type``: linear (the paper's ``T h``) or mlp (``T h`` plus an MLP of
    hidden size ``mlp_hidden``; runtime/exit_heads.py). ``vocab_size`` (an int or "full") or
    ``vocab_coverage`` sets the restricted vocabulary (default ``DEFAULT_VOCAB_SIZE``). The
    manifest's default heads are those the runtime's own choice (runtime/sim/heads.py) makes for
    ``defaults_for`` ranks on this device with ``defaults_policy`` backfill; at run time heads are
    chosen per setting anyway unless ``decoding.auto_heads`` is false. ``device`` (auto, cpu, cuda,
    cuda:N) and ``dtype`` (auto, float32, bfloat16, float16) place the base model; the heads train
    in float32 there and are stored in ``save_dtype``. ``threads`` > 0 sets torch's threads.
    ``argv``: the command-line arguments, recorded in the manifest (None: not a command).

    Returns the manifest. Raises ValueError (``PlacementError`` for ``device``/``dtype``) with
    the fix for bad arguments, before the model loads where it can.
    """
    from ..exit_heads import HEAD_TYPES, ExitHeads, save_exit_heads
    from ..hf_adapter import load_hf_config
    from ..model_source import resolve_model
    from ..prompts import read_prompts

    t_start = time.perf_counter()
    if vocab_size is not None and vocab_coverage is not None:
        raise ValueError("give vocab_size or vocab_coverage, not both")
    if head_type not in HEAD_TYPES:
        raise ValueError(f"--head-type {head_type!r}: expected one of {', '.join(HEAD_TYPES)}")
    if mlp_hidden < 1:
        raise ValueError(f"--mlp-hidden {mlp_hidden}: expected a hidden size >= 1 (256 by default)")
    if save_dtype not in SAVE_DTYPES:
        raise ValueError(f"save_dtype {save_dtype!r}: expected one of {', '.join(SAVE_DTYPES)}")
    dev, dt = _setting(defaults_for, defaults_policy, device, dtype, threads)
    torch.manual_seed(seed)

    def log(msg: str) -> None:
        print(f"[train-heads {time.perf_counter() - t_start:6.0f}s] {msg}", file=sys.stderr, flush=True)

    # --- the prompts (read before the model loads): train / validation (every val_every-th) / held-out ---
    train_prompts = read_prompts(prompts)
    held_prompts = read_prompts(heldout)
    every = val_every
    _check_every(every, train_prompts, prompts)
    validation = Validation.read(prompts, train_prompts, every, extra_files(validation_extra))
    _check_out(out)
    groups = {
        "train": split_prompts(train_prompts, every)[0],
        "validation": validation.prompts,
        "heldout": held_prompts,
    }

    # --- the base model, frozen, on its device ---
    resolved = resolve_model(model)
    config = load_hf_config(resolved.path)
    num_layers, d, vocab = config.num_hidden_layers, config.hidden_size, config.vocab_size
    # stage boundaries of 2-4 ranks: there an exit lets the next token in as its stage hands over
    boundaries = [b for p in range(2, 5) if p < num_layers for _, b in plan_stages(config, p)[:-1]]
    layers = parse_layers(layers, num_layers, boundaries)
    base, tokenizer, eos, pad = load_base(resolved, dev, dt, "train-heads")
    norm, lm_head = base.model.norm, base.lm_head.weight
    ids = {name: [encode(tokenizer, p) for p in ps] for name, ps in groups.items()}
    kind = f"mlp-{mlp_hidden}" if head_type == "mlp" else head_type
    log(f"{resolved.origin}: {num_layers} layers, hidden {d}, vocab {vocab}; {dev}, {dtype_name(dt)}; "
        f"candidate {kind} heads at {layers}; prompts: {', '.join(f'{k} {len(v)}' for k, v in ids.items())}")

    # --- 1. the greedy pass, keeping the hidden states ---
    everything = [x for name in groups for x in ids[name]]
    items = collect(base, everything, layers, max_new_tokens=max_new_tokens,
                    batch_size=gen_batch_size, eos=eos, pad=pad, progress=progress)
    splits, at = {}, 0
    files = {"train": prompts, "validation": validation.label, "heldout": heldout}
    for name in groups:
        splits[name] = make_split(name, files[name], items[at : at + len(ids[name])], layers)
        if name == "validation":
            val_items = items[at : at + len(ids[name])]
            val_counts = [len(it["tokens"]) for it in val_items]
            val_lookup = lookup_outcomes(ids[name], [it["tokens"].tolist() for it in val_items])
        at += len(ids[name])
    del items
    t_collect = time.perf_counter() - t_start
    log("generated tokens: " + ", ".join(f"{k} {s.tokens}" for k, s in splits.items()))

    # --- 2. the restricted vocabulary ---
    size = str(vocab_size) if vocab_size else (None if vocab_coverage else str(DEFAULT_VOCAB_SIZE))
    vocab_ids = choose_vocabulary(splits["train"].targets, vocab, size=size, coverage=vocab_coverage,
                                  soft=lambda: soft_counts(splits["train"].final, lm_head))
    weight = lm_head if vocab_ids is None else lm_head[vocab_ids].contiguous()  # [K, D], the model's dtype
    k = weight.shape[0]
    covered = {name: round(coverage(s.targets, vocab_ids), 4) for name, s in splits.items()}
    log(f"vocabulary: {k} tokens; coverage of the greedy outputs {covered}")

    # --- 3. the heads, in float32 on the device ---
    params, history = train(
        splits["train"], layers, norm, weight, epochs=epochs, lr=lr, batch_size=batch_size,
        warmup=warmup, seed=seed, head_type=head_type, mlp_hidden=mlp_hidden, progress=progress,
    )
    history = {l: h.tolist() for l, h in history.items()}  # [epochs] mean KL per layer
    t_train = time.perf_counter() - t_start - t_collect
    log("KL per epoch: " + "; ".join(f"{l}: {h[0]:.3f} -> {h[-1]:.3f}" for l, h in history.items()))

    # --- 4. calibration of what will run: the heads as stored (rounded to save_dtype) and cast
    # to the base model's dtype, as the runtime casts them, with the restricted head ---
    save_dt = getattr(torch, save_dtype)
    stored = {l: {name: t.to(save_dt).to(dt) for name, t in p.items()} for l, p in params.items()}
    heads = ExitHeads(stored, norm, weight, vocab_ids, {l: 0.0 for l in layers},
                      {"default_layers": [], "default_thresholds": {}},
                      logit_softcap=getattr(config, "final_logit_softcapping", None))  # as the runtime loads them
    outcomes = {name: head_outcomes(heads, splits[name]) for name in ("validation", "heldout")}  # on the host

    # --- 5. the defaults: the runtime's own head choice (runtime/sim/heads.py) for one setting ---
    chosen, choice = defaults_from_outcomes(outcomes["validation"], splits["validation"], validation, config,
                                            head_type=head_type, mlp_hidden=mlp_hidden, vocab_rows=k,
                                            defaults_for=defaults_for,
                                            defaults_policy=defaults_policy, device=dev, dtype=dt)
    log(f"defaults: {dict(zip(choice.layers, choice.thresholds))} ({choice.note})")

    manifest = {
        "base_model": {
            "fingerprint": resolved.fingerprint,
            "origin": resolved.origin,
            "model_type": config.model_type,
            "num_layers": num_layers,
            "hidden_size": d,
            "vocab_size": vocab,
        },
        "head_type": head_type,
        **({"mlp_hidden": mlp_hidden} if head_type == "mlp" else {}),
        "layers": layers,
        "default_layers": chosen["default_layers"],
        "default_thresholds": chosen["default_thresholds"],
        "vocabulary": {
            "restricted": vocab_ids is not None,
            "size": k,
            "coverage_target": vocab_coverage,
            "coverage": covered,
        },
        "choice": chosen["choice"],
        "calibration": calibration_table(outcomes["heldout"], splits["heldout"]),
        "validation_calibration": chosen["validation_calibration"],
        "training": {
            "command": shlex.join(["adadecode", "train-heads", *argv]) if argv is not None else None,
            "argv": list(argv) if argv is not None else None,
            "data": {
                name: validation.record(val_counts) if name == "validation" else
                {"file": s.file, "sha256": sha256(s.file), "prompts": s.prompts, "tokens": s.tokens}
                for name, s in splits.items()
            },
            "hyperparameters": {
                "epochs": epochs, "lr": lr, "batch_size": batch_size, "warmup": warmup,
                "schedule": "linear warmup, cosine to 0", "optimizer": "Adam",
                "loss": "KL(final || head) over the head's vocabulary",
                "max_new_tokens": max_new_tokens, "val_every": every, "seed": seed,
                "save_dtype": save_dtype,
                "init": "identity" if head_type == "linear" else "T identity, W1 random, W2 zero, g ones",
            },
            "loss_per_epoch": {str(l): [round(x, 5) for x in h] for l, h in history.items()},
            "threads": torch.get_num_threads(),
            "device": str(dev),  # the base model's greedy pass and the heads' training
            "dtype": dtype_name(dt),  # the base model's; the heads always train in float32
            "seconds": {"collect": round(t_collect, 1), "train": round(t_train, 1),
                        "total": round(time.perf_counter() - t_start, 1)},
            "versions": {"torch": torch.__version__, "transformers": _version("transformers")},
        },
    }
    host_ids = vocab_ids.cpu() if vocab_ids is not None else None
    host_params = {l: {name: t.cpu() for name, t in p.items()} for l, p in params.items()}
    save_exit_heads(out, host_params, host_ids, manifest, dtype=save_dt,
                    outcomes=outcome_tensors(outcomes["validation"], val_lookup))
    log(f"wrote {out}: heads at {layers}, defaults {dict(zip(choice.layers, choice.thresholds))}")
    return manifest


def recompute_outcomes(
    out: str | Path,
    *,
    model: str | None = None,
    prompts: str | None = None,
    val_every: int | None = None,
    validation_extra: str | Sequence[str] | None = None,
    max_new_tokens: int | None = None,
    gen_batch_size: int = 48,
    defaults_for: int | None = None,
    defaults_policy: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    threads: int = 0,
    progress: bool = True,
    argv: Sequence[str] | None = None,
) -> dict:
    """``train-heads --outcomes-only``: each validation token's outcome at every head for the heads
    already in ``out``, without training them, and what follows from the outcomes.

    The heads load through the runtime's own loader (``exit_heads.load_exit_heads``: checksum and
    base model checked); the base model answers the validation prompts greedily exactly as in
    training (the train file's every ``val_every``-th prompt, plus all of the ``validation_extra``
    files) and ``head_outcomes`` scores the answers. Writes ``outcomes.safetensors`` and updates the
    manifest: its checksums, ``validation_calibration``, the defaults and ``choice``
    (``defaults_from_outcomes``, as training does), the vocabulary's validation coverage,
    ``training.data.validation`` and an ``outcomes`` record of this run. ``heads.safetensors`` is
    never written; the held-out ``calibration`` stays as it was (the same heads).

    Left as None, an argument is what the manifest records: ``model`` (its origin, when a bundled
    model, a directory or a GGUF file), ``prompts`` (the validation file), ``val_every`` (a
    different one is refused: it would validate on prompts the heads trained on),
    ``max_new_tokens``, ``validation_extra`` (the extra files it lists; "none": none) and the
    defaults' setting (else 2 ranks, eager). Returns the manifest; ValueError with the fix for a
    directory without heads and for bad arguments, before the model loads where it can.
    """
    from ..exit_heads import HEADS_FILE, MANIFEST_FILE, file_record, load_exit_heads, read_manifest, save_outcomes
    from ..hf_adapter import load_hf_config
    from ..model_source import resolve_model
    from ..prompts import read_prompts

    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[train-heads --outcomes-only {time.perf_counter() - t_start:6.0f}s] {msg}", file=sys.stderr,
              flush=True)

    path = Path(out)
    if not (path / MANIFEST_FILE).is_file() or not (path / HEADS_FILE).is_file():
        raise ValueError(f"--out {out} holds no exit heads ({MANIFEST_FILE} and {HEADS_FILE}); --outcomes-only "
                         f"records the outcomes of heads trained there before: train them first with "
                         f"`adadecode train-heads --out {out}`")
    manifest = read_manifest(path)
    training = manifest.get("training") or {}
    hyper = training.get("hyperparameters") or {}
    recorded = (training.get("data") or {}).get("validation") or {}
    setting = (manifest.get("choice") or {}).get("setting") or {}
    train_defaults = {name: p.default for name, p in inspect.signature(train_heads).parameters.items()}

    # --- the validation prompts, by the rule the heads were trained with ---
    prompts = prompts or recorded.get("file") or train_defaults["prompts"]
    trained_every = hyper.get("val_every")
    every = val_every or trained_every or train_defaults["val_every"]
    if trained_every and every != trained_every:
        raise ValueError(f"--val-every {every}: the heads in {out} were trained with --val-every {trained_every}; "
                         "another rule would validate on prompts they trained on (leave --val-every out)")
    train_prompts = read_prompts(prompts)
    if recorded.get("sha256") and sha256(prompts) != recorded["sha256"]:
        raise ValueError(f"--prompts {prompts} is not the file the heads in {out} were trained on "
                         f"({recorded.get('file')}, sha256 {recorded['sha256'][:12]}...): its every {every}-th "
                         "prompts may be prompts they trained on; give that file, and other prompts with "
                         "--validation-extra")
    _check_every(every, train_prompts, prompts)
    if validation_extra is None:  # what the manifest lists, so that a rerun validates on the same prompts
        validation_extra = [f["file"] for f in recorded.get("files", [])[1:]] or "none"
    validation = Validation.read(prompts, train_prompts, every, extra_files(validation_extra))
    max_new_tokens = max_new_tokens or hyper.get("max_new_tokens") or train_defaults["max_new_tokens"]
    defaults_for = defaults_for or setting.get("stages") or train_defaults["defaults_for"]
    defaults_policy = defaults_policy or setting.get("policy") or train_defaults["defaults_policy"]
    dev, dt = _setting(defaults_for, defaults_policy, device, dtype, threads)

    # --- the base model, and the heads as the runtime loads them ---
    base_record = manifest["base_model"]
    resolved = resolve_model(model or _model_of(base_record.get("origin")) or train_defaults["model"])
    if resolved.fingerprint != base_record["fingerprint"]:
        raise ValueError(f"the heads in {out} are for {base_record.get('origin')} (fingerprint "
                         f"{base_record['fingerprint'][:12]}...), not {resolved.origin} "
                         f"({resolved.fingerprint[:12]}...); give --model the model they were trained for")
    config = load_hf_config(resolved.path)
    base, tokenizer, eos, pad = load_base(resolved, dev, dt, "train-heads")
    heads = load_exit_heads(path, fingerprint=resolved.fingerprint, config=config, norm=base.model.norm,
                            lm_head_weight=base.lm_head.weight)
    layers = list(heads.available_layers)
    heads_record = dict((manifest.get("files") or {}).get(HEADS_FILE) or file_record(path / HEADS_FILE))
    ids = [encode(tokenizer, p) for p in validation.prompts]
    log(f"{resolved.origin}: heads at {layers} from {out}; {dev}, {dtype_name(dt)}; validation prompts: "
        + ", ".join(f"{f} {len(p)}" for f, p in zip(validation.files, validation.parts))
        + f"; up to {max_new_tokens} new tokens each")

    # --- the greedy pass over the validation prompts, and each token's outcome at every head ---
    items = collect(base, ids, layers, max_new_tokens=max_new_tokens, batch_size=gen_batch_size, eos=eos,
                    pad=pad, progress=progress)
    split = make_split("validation", validation.label, items, layers)
    counts = [len(it["tokens"]) for it in items]
    lookup = lookup_outcomes(ids, [it["tokens"].tolist() for it in items])
    del items
    t_collect = time.perf_counter() - t_start
    outcomes = head_outcomes(heads, split)  # on the host
    log(f"validation tokens: {split.tokens}")

    # --- what follows from them, as in training ---
    head_type = manifest.get("head_type", "linear")
    chosen, choice = defaults_from_outcomes(outcomes, split, validation, config, head_type=head_type,
                                            mlp_hidden=manifest.get("mlp_hidden", 0),
                                            vocab_rows=manifest.get("vocabulary", {}).get("size", DEFAULT_VOCAB_SIZE),
                                            defaults_for=defaults_for,
                                            defaults_policy=defaults_policy, device=dev, dtype=dt)
    log(f"defaults: {dict(zip(choice.layers, choice.thresholds))} ({choice.note})")
    manifest.update(chosen)  # keys already there keep their place
    vocab = manifest.get("vocabulary")
    if isinstance(vocab, dict) and isinstance(vocab.get("coverage"), dict):
        vocab["coverage"]["validation"] = round(coverage(split.targets, heads.vocab_ids), 4)
    if isinstance(training.get("data"), dict):
        training["data"]["validation"] = validation.record(counts)
    manifest["outcomes"] = {
        "note": ("outcomes.safetensors, validation_calibration, the defaults and choice recomputed for the heads "
                 "as trained (`train-heads --outcomes-only`; heads.safetensors unchanged)"),
        "command": shlex.join(["adadecode", "train-heads", *argv]) if argv is not None else None,
        "argv": list(argv) if argv is not None else None,
        "max_new_tokens": max_new_tokens, "val_every": every,
        "threads": torch.get_num_threads(), "device": str(dev), "dtype": dtype_name(dt),
        "seconds": {"collect": round(t_collect, 1), "total": round(time.perf_counter() - t_start, 1)},
        "versions": {"torch": torch.__version__, "transformers": _version("transformers")},
    }
    save_outcomes(path, outcome_tensors(outcomes, lookup), manifest, heads_record)
    log(f"wrote {path / 'outcomes.safetensors'} ({split.tokens} tokens) and {path / MANIFEST_FILE}")
    return manifest


def _model_of(origin: str | None) -> str | None:
    """The model source a manifest's ``base_model.origin`` names, where it names one to load again."""
    kind, _, where = (origin or "").partition(":")
    return origin if kind == "bundled" else where if kind in ("dir", "gguf") else None


def defaults_from_outcomes(outcomes, split: Split, validation: Validation, config, *, head_type: str,
                           mlp_hidden: int, vocab_rows: int, defaults_for: int, defaults_policy: str,
                           device: torch.device, dtype: torch.dtype) -> tuple[dict, HeadChoice]:
    """The manifest's keys that follow from the heads' validation ``outcomes`` (``head_outcomes`` on
    ``split``, the prompts of ``validation``): ``validation_calibration``, and ``default_layers``,
    ``default_thresholds`` and ``choice``, the runtime's own head choice (runtime/sim/heads.py) for
    ``defaults_for`` ranks with ``defaults_policy`` backfill on ``device`` in ``dtype``, replaying
    the outcomes token by token, each head evaluation priced with its ``vocab_rows`` LM-head rows. One
    function for training and ``--outcomes-only``; returns those keys and the choice."""
    tables = {"validation_calibration": calibration_table(outcomes, split)}
    ranges = plan_stages(config, defaults_for)
    kind_keys = {"head_type": head_type, **({"mlp_hidden": mlp_hidden} if head_type == "mlp" else {}),
                 "vocabulary": {"size": vocab_rows}}
    choice = choose({**tables, **kind_keys}, config, ranges, defaults_policy, device.type,
                    torch.empty((), dtype=dtype).element_size(),
                    max_inflight=2, ranks=True, outcomes=outcomes, alone=True)
    keys = {
        "default_layers": sorted(choice.layers),
        "default_thresholds": {str(l): t for l, t in choice.alone},
        "choice": {
            "note": (
                f"Defaults chosen on the validation prompts ({validation.describe()}) "
                "by the runtime's per-setting head choice (runtime/sim/heads.py) for the setting below: the "
                "simulated speedup over early exit off, the validation answers replayed token by token in order, "
                "each token exiting at the first head above its threshold, none where none is predicted to pay. "
                "Heads outside the defaults carry the threshold best for them alone in that setting."
            ),
            "split": "validation",
            "setting": {"stages": defaults_for, "ranks": True, "policy": defaults_policy, "device": device.type,
                        "dtype": dtype_name(dtype), "max_inflight": 2},
            "simulated_speedup": choice.speedup,
            "summary": choice.note,
        },
        **tables,
    }
    return keys, choice


def parse_layers(spec: str | Sequence[int], num_layers: int, boundaries: Sequence[int] = ()) -> list[int]:
    """Head layers from ``spec``: "auto" (every L/10 layers from 0.13 L to L-2, plus ``boundaries``:
    the first layers of later stages), "8,12,16" or a list; each must lie in 1..L-1."""
    if spec == "auto":
        every = range(max(1, round(0.13 * num_layers)), num_layers - 1, max(1, round(num_layers / 10)))
        layers = sorted({*every, *(b for b in boundaries if 0 < b < num_layers - 1)})
    else:
        try:
            layers = sorted({int(x) for x in (spec.split(",") if isinstance(spec, str) else spec) if str(x).strip()})
        except ValueError as e:
            raise ValueError(f"--layers {spec!r}: expected comma-separated integers such as 8,12,16, or auto") from e
    bad = [l for l in layers if not 0 < l < num_layers]
    if bad or not layers:
        raise ValueError(f"--layers {spec!r}: head layers must lie in 1..{num_layers - 1} for this "
                         f"{num_layers}-layer model (a head at l reads the input of layer l)")
    return layers


def _check_out(out: str | Path) -> None:
    """Refuse an ``out`` that cannot be written now, not after the training it is to hold (the write
    itself is atomic: exit_heads.save_exit_heads)."""
    path = Path(out).absolute()
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out} is a file; give the directory to write the heads into")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {existing} is not writable; choose another directory")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _setting(defaults_for: int, defaults_policy: str, device, dtype, threads: int):
    """The checked setting of a run (training or --outcomes-only): the defaults' setting, the
    device and dtype (returned), and the torch threads."""
    if defaults_policy not in ("eager", "deferred"):
        raise ValueError(f"--defaults-policy {defaults_policy!r}: expected eager or deferred")
    if defaults_for < 1:
        raise ValueError(f"--defaults-for {defaults_for}: expected a number of ranks >= 1")
    dev, dt = check_placement(device, dtype, "inprocess")
    if threads > 0:
        torch.set_num_threads(threads)
    return dev, dt


def _check_every(every: int, train_prompts: Sequence, prompts: str) -> None:
    if every < 2 or len(train_prompts) < every:
        raise ValueError(f"--val-every {every}: need at least 2 and at most the {len(train_prompts)} prompts of "
                         f"{prompts}, so that both training and validation prompts remain (the defaults are "
                         "chosen on the validation prompts; the held-out ones are for evaluation only)")
