"""What to load, and loading it: one ``LoadSpec`` for the whole pipeline, one stage per call.

``LoadSpec`` is the single description of a pipeline's weights: the model, its
split into stages, where and in which dtype each stage computes, the KV cache
size and the exit heads. ``Engine.load`` builds every stage from it in one
process; ``load_rank`` (engine.py) builds only rank ``i``'s stage from the same spec, so a
rank never materialises another stage's weights (docs/design.md, invariant 5). Every
rank computes the same plan: ``plan_stages`` is a pure function.

    spec = LoadSpec("bundled:smollm2-135m-instruct", stages=2, dtype="bfloat16")
    resolved, config, ranges = prepare(spec)  # then, per stage i: build_stage(spec, resolved, config, ranges, i, ...)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .device import dtype_name
from .hf_adapter import ModelArgs, check_rope_length, honours_sliding_window, load_hf_config, load_stage_modules
from .model_runner import StageModel
from .model_source import ResolvedModel, resolve_model
from .params import BATCHING_MODES, COMPILE_MODES, compiles
from .partition import partition_layers
from .row_invariant import MODES as ROW_INVARIANT_MODES
from .stage import Stage
from .work_queue import group_size

log = logging.getLogger("adadecode.loading")


DEFAULT_DRAFT = 3  # a token and 3 drafts: 4 rows, the most one call streams the weights for (compiled_step.FUSED_ROWS)


@dataclass(frozen=True)
class LoadSpec:
    """Everything that decides what a pipeline's stages hold (see ``Engine.load`` for the fields)."""

    source: str = "bundled:smollm2-135m-instruct"
    stages: int = 1
    split_points: tuple[int, ...] = ()
    device: str = "auto"  # auto, cpu, cuda, cuda:N (runtime/device.py)
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16
    max_seq_len: int = 2048
    cache_dir: str | None = None
    revision: str | None = None  # a Hub id's branch, tag or commit (runtime/model_source.py)
    heads: str | None = "auto"  # exit-heads directory, "auto" (the bundled model's), or None
    exit_layers: tuple[int, ...] = ()
    thresholds: tuple[float, ...] = ()
    compile: str = "auto"  # the compiled layer loop: auto (on for CUDA), on, off (runtime/compiled_step.py)
    # unverified early tokens per sequence (chunks of up to max_inflight + 1 rows get compiled);
    # 0: chosen with the heads before loading (runtime/engine.py), 2 where nothing is chosen
    max_inflight: int = 2
    lookup: int = 3  # the Coordinator's context lookup: shortest match (runtime/context_lookup.py); 0: off
    # with lookup, the most drafts a greedy decode request carries (coordinator.py); 0: none; -1: auto,
    # DEFAULT_DRAFT where a chunk's decode rows share one call (``shared_merges``), else none (``drafts``)
    draft: int = -1
    # where drafts run: the table of the model's own answers they fall back on (runtime/draft_table.py):
    # a .safetensors file, "auto" (the bundled model's), or None
    draft_table: str | None = "auto"
    num_slots: int = 1  # sequences a stage can hold at once (one KV cache slot each)
    batching: str = "exact"  # serve.batching: exact, fused, auto (``exact_batches``)
    row_invariant: str = "auto"  # merged rows get the bits they get alone: auto, on, off (runtime/row_invariant.py)
    compile_warmup: bool = True  # compile every chunk shape at load, so that no generation pays a compile
    # Before loading, choose the heads for this setting and this early-exit policy (runtime/sim/heads.py,
    # plan_heads) when exit_layers and thresholds are empty; None: the heads' manifest defaults.
    auto_heads_for: str | None = None
    # the generation_config.json whose EOS ids end generation: auto (the model's), none, or a directory
    generation_config: str = "auto"

    def __post_init__(self) -> None:
        for name in ("split_points", "exit_layers", "thresholds"):  # lists from a config become tuples
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.heads is not None:
            object.__setattr__(self, "heads", str(self.heads))
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile `{self.compile}` is unknown; use one of {', '.join(COMPILE_MODES)}")
        if self.row_invariant not in ROW_INVARIANT_MODES:
            raise ValueError(
                f"row_invariant `{self.row_invariant}` is unknown; use one of {', '.join(ROW_INVARIANT_MODES)}"
            )
        if self.batching not in BATCHING_MODES:
            raise ValueError(f"batching `{self.batching}` is unknown; use one of {', '.join(BATCHING_MODES)}")

    def replace(self, **changes) -> LoadSpec:
        return dataclasses.replace(self, **changes)

    def compiled(self, device_type: str) -> bool:
        """Whether stages on ``device_type`` run the compiled layer loop: ``auto`` compiles on CUDA
        only (runtime/compiled_step.py, maybe_compile)."""
        return compiles(self.compile, device_type)

    def exact_batches(self, model) -> bool:
        """Whether a stage runs each sequence of a batch through each layer alone (``Stage``'s
        ``exact_batches``): ``exact``; or ``auto`` unless ``model`` runs a batch's decode rows in
        one compiled call with each row's own bits (``StageModel.merges_rows``)."""
        if self.batching == "auto":
            return not model.merges_rows
        return self.batching == "exact"

    @property
    def chooses_heads(self) -> bool:
        """Whether the heads are left to the per-setting choice: early exit on, none given."""
        return self.auto_heads_for not in (None, "off") and not self.exit_layers and not self.thresholds

    def drafts(self, device_type: str) -> int:
        """The most drafts per request on ``device_type``: ``draft``, or for auto (-1) ``DEFAULT_DRAFT``
        where a chunk of a token and its drafts costs about one row (``shared_merges``) and none where
        each row is its own call, so a draft costs a row (docs/results.md, Lookup drafts); none
        without the lookup."""
        if not self.lookup:
            return 0
        if self.draft >= 0:
            return self.draft
        return DEFAULT_DRAFT if self.shared_merges(device_type) else 0

    def shared_merges(self, device_type: str) -> bool:
        """Whether a merged chunk's decode rows run as one call, costing about one row's weight
        reads: with ``row_invariant`` off (a shared call whose last bits may differ), or compiled
        on the CPU with ``auto`` (the C++ GEMM template gives each row its own bits in the shared
        call: ``CompiledStep.merges``). Otherwise each row is its own call."""
        if self.row_invariant == "off":
            return True
        return self.row_invariant == "auto" and device_type == "cpu" and self.compiled(device_type)


@dataclass
class LoadedStage:
    """One stage as loaded, with what loading it cost (reported once at start-up)."""

    stage: Stage
    seconds: float
    weight_bytes: int
    peak_host_mb: float  # host memory (RSS) the load added at its peak, file pages included; -1: unknown
    heads_choice: object = None  # the sim.heads.HeadChoice made for this setting before loading, if one was
    max_inflight: int = 2  # as planned with the heads (the Coordinator's)
    lookup: int = 0  # the context lookup the heads were planned with (the Coordinator's)
    draft: int = 0  # the Coordinator's drafts per request
    table: object = None  # rank 0: the Coordinator's draft table (runtime/draft_table.py), or None


def prepare(spec: LoadSpec) -> tuple[ResolvedModel, object, list[tuple[int, int]]]:
    """What every loader does first: resolve the model, check the cache size and plan the stages."""
    resolved = resolve_model(spec.source, spec.cache_dir, spec.revision)
    config = load_hf_config(resolved.path)
    _check_seq_len(config, ModelArgs.from_hf_config(config), spec.max_seq_len)
    return resolved, config, plan_stages(config, spec.stages, spec.split_points)


def plan_stages(config, stages: int, split_points: Sequence[int] = ()) -> list[tuple[int, int]]:
    """Layer ranges per stage; automatic splits balance the weights read per decoded token."""
    args = ModelArgs.from_hf_config(config)
    layer = args.layer_params(config.intermediate_size)
    lm_head = args.vocab_size * args.hidden_size
    # The embedding is one row gathered per token; the LM head is a full matrix read.
    return partition_layers(args.num_layers, stages, split_points, last_extra=lm_head / layer)


def build_stage(
    spec: LoadSpec,
    resolved: ResolvedModel,
    config,
    ranges: Sequence[tuple[int, int]],
    index: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> LoadedStage:
    """Load stage ``index`` of ``ranges`` onto ``device`` and only its weights: what one rank holds.

    A stage loads the final norm and LM head when it is the last, or when one of the exit
    heads it evaluates (layers in ``(a, b]``) needs them (docs/design.md, invariant 5). The
    heads are ``spec.exit_layers`` (else the manifest's defaults): choosing them for the
    setting happens before loading (runtime/sim/heads.py, ``plan_heads``).
    """
    t0 = time.perf_counter()
    rss0 = _reset_peak_rss()
    a, b = ranges[index]
    last = index == len(ranges) - 1
    args = ModelArgs.from_hf_config(config)
    heads_path = resolve_heads(spec.heads, resolved)
    mine: list[int] = []
    layers: list[int] = []
    if heads_path is not None:
        from .exit_heads import read_manifest

        layers = list(spec.exit_layers) or list(read_manifest(heads_path)["default_layers"])
        mine = [l for l in layers if a < l <= b and l < args.num_layers]
    modules = load_stage_modules(
        resolved.path, config, a, b, embed=index == 0, head=last or bool(mine), dtype=dtype, device=device
    )
    stage_heads = None
    if mine:
        from .exit_heads import load_exit_heads

        stage_heads = load_exit_heads(
            heads_path, fingerprint=resolved.fingerprint, config=config,
            norm=modules.norm, lm_head_weight=modules.lm_head.weight,
        ).select(layers=mine, thresholds=_thresholds_for(layers, spec.thresholds, mine))
    model = StageModel(modules, args, spec.max_seq_len, num_slots=spec.num_slots)
    model.row_invariant = spec.row_invariant
    if spec.max_inflight < 1:
        raise ValueError(f"max_inflight {spec.max_inflight}: choose it before loading (runtime/engine.py) or give >= 1")
    if spec.compile != "off":
        from .compiled_step import maybe_compile

        # a fused batch's decode rows: a stage of a pipeline runs its share of the sequences (group_size)
        batch_rows = group_size(spec.num_slots, len(ranges)) if spec.batching != "exact" else 0
        cuts = stage_heads.layers if stage_heads else ()
        # a merged chunk: a token and its drafts, or backfills and the next token (with its drafts,
        # where heads run beside them: a backfill parks only where a head let its token out)
        draft = spec.drafts(device.type)
        chunk = (spec.max_inflight + draft if spec.heads is not None else max(spec.max_inflight, draft)) + 1
        if maybe_compile(model, spec.compile, cuts, chunk, batch_rows):
            if spec.compile_warmup:
                model.warm_up()
    params = {  # by storage: a tied LM head is the embedding
        p.data_ptr(): p.numel() * p.element_size()
        for m in (modules.layers, modules.embed, modules.norm, modules.lm_head) if m is not None
        for p in m.parameters()
    }
    weight_bytes = sum(params.values())
    loaded = LoadedStage(
        Stage(index, len(ranges), model, heads=stage_heads, exact_batches=spec.exact_batches(model)),
        seconds=time.perf_counter() - t0,
        weight_bytes=weight_bytes,
        peak_host_mb=(_peak_rss() - rss0) / 1e6 if rss0 >= 0 else -1.0,
    )
    log.info(
        "stage %d: layers [%d, %d) on %s in %s, %.0f MB of weights, loaded in %.1f s; host memory peak +%.0f MB",
        index, a, b, device, dtype_name(dtype), weight_bytes / 1e6, loaded.seconds, loaded.peak_host_mb,
    )
    return loaded


def _reset_peak_rss() -> int:
    """Reset this process's peak RSS to its current RSS (Linux); return that RSS in bytes, -1 if unknown."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmRSS") * 1024
    except OSError:
        return -1


def _peak_rss() -> int:
    return _status_kib("VmHWM") * 1024


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(key + ":")))


def resolve_heads(heads: str | Path | None, resolved: ResolvedModel) -> Path | None:
    """The exit-heads directory ``heads`` names: ``auto`` is the shipped heads of the bundled model."""
    if heads is None or str(heads) in ("", "none"):
        return None
    if str(heads) == "auto":
        from .exit_heads import bundled_heads_path

        return _bundled(resolved, bundled_heads_path)
    path = Path(heads).expanduser()
    if not (path / "manifest.json").exists():
        raise ValueError(
            f"exit heads `{heads}`: no manifest.json there; point decoding.heads at the directory "
            "`adadecode train-heads --out DIR` wrote, or use `auto` / `none`"
        )
    return path


def _bundled(resolved: ResolvedModel, path_for: Callable[[str], Path]) -> Path | None:
    """``auto``'s asset: ``path_for(name)`` for the bundled model ``name`` where it exists, else None."""
    if not resolved.origin.startswith("bundled:"):
        return None
    path = path_for(resolved.origin.split(":", 1)[1])
    return path if path.exists() else None


def resolve_draft_table(spec: LoadSpec, resolved: ResolvedModel, config):
    """The draft table for ``spec`` (its ``draft`` resolved: ``_plan``), or None where no drafts run or
    none is named; ``auto`` is the table shipped for the bundled model."""
    name = spec.draft_table
    if name is None or str(name) in ("", "none"):
        return None
    if not spec.draft:
        if str(name) != "auto":
            log.warning("decoding.draft_table=%s is not used: no drafts run here (decoding.draft resolves to 0 "
                        "on this device and path); set e.g. --decoding.draft=3 to draft", name)
        return None
    from .draft_table import bundled_table_path, load_draft_table

    path = _bundled(resolved, bundled_table_path) if str(name) == "auto" else Path(name).expanduser()
    if path is None:
        return None
    table = load_draft_table(path, fingerprint=resolved.fingerprint, vocab_size=config.vocab_size)
    log.info("draft table %s: %d n-grams", path, len(table))
    return table


def _thresholds_for(layers: Sequence[int], thresholds: Sequence[float], mine: Sequence[int]):
    """``thresholds`` as ExitHeads.select takes them: None, one for all, or per layer of ``mine``."""
    if not thresholds:
        return None
    if len(thresholds) == 1:
        return float(thresholds[0])
    if len(thresholds) != len(layers):
        raise ValueError(
            f"decoding.thresholds has {len(thresholds)} values for {len(layers)} exit layers {list(layers)}; "
            "give one threshold for all, or one per exit layer"
        )
    per_layer = dict(zip(layers, thresholds))
    return {l: float(per_layer[l]) for l in mine}


def _check_seq_len(config, args: ModelArgs, max_seq_len: int) -> None:
    if max_seq_len > args.max_position_embeddings:
        raise ValueError(
            f"model.max_seq_len {max_seq_len} exceeds the model's max_position_embeddings "
            f"({args.max_position_embeddings}); lower model.max_seq_len"
        )
    check_rope_length(config, max_seq_len)
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and max_seq_len > window \
            and not honours_sliding_window(config):
        raise ValueError(
            f"model.max_seq_len {max_seq_len} exceeds the model's sliding window ({window}), which "
            f"adadecode does not implement; set model.max_seq_len <= {window}"
        )
