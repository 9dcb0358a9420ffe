"""The Python API: load a model once as pipeline stages, generate many times.

    from adadecode.runtime import Engine
    engine = Engine.load("bundled:smollm2-135m-instruct", stages=2)
    result = engine.generate("Write a haiku about the sea.", max_new_tokens=64, chat=True)
    print(result.text, result.tokens_per_s)

``Engine`` wires the tokenizer, the Coordinator and the Stages to a runner; it
takes plain arguments, so the launcher maps each config section onto them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


from .coordinator import Coordinator
from .events import Verified
from .hf_adapter import DTYPES, ModelArgs, load_hf_config, load_stage_modules
from .kv_cache import CacheOverflowError
from .model_runner import StageModel
from .model_source import ResolvedModel, resolve_model
from .partition import partition_layers
from .runners.inprocess import LocalRunner
from .stage import Stage
from .stopping import StopCriteria, trim_at_stop_string

EARLY_EXIT_MODES = ("off", "eager", "deferred")


@dataclass
class GenerationResult:
    prompt_tokens: int
    tokens: list[int]  # generated ids, EOS / stop token included
    text: str
    finish_reason: str
    tokens_per_s: float
    stats: dict = field(default_factory=dict)


class Engine:
    def __init__(
        self, resolved: ResolvedModel, config, tokenizer, stages: list[Stage], max_seq_len: int, max_inflight: int = 2
    ):
        self.resolved = resolved
        self.config = config
        self.args = ModelArgs.from_hf_config(config)
        self.tokenizer = tokenizer
        self.stages = stages
        self.max_seq_len = max_seq_len
        self.runner = LocalRunner(stages)
        self.eos_token_ids = _eos_ids(resolved.path, config, tokenizer)
        self.max_inflight = max_inflight
        self._next_seq = 0

    @classmethod
    def load(
        cls,
        source: str = "bundled:smollm2-135m-instruct",
        *,
        stages: int = 1,
        split_points: Sequence[int] = (),
        dtype: str = "float32",
        max_seq_len: int = 2048,
        cache_dir: str | Path | None = None,
        heads: str | Path | None = "auto",
        exit_layers: Sequence[int] = (),
        thresholds: Sequence[float] = (),
        max_inflight: int = 2,
    ) -> Engine:
        """Resolve ``source``, split its layers into ``stages`` and load each stage's weights.

        ``heads``: a directory of exit heads, ``"auto"`` (the heads shipped for the bundled
        model, none for others) or None. ``exit_layers`` / ``thresholds`` override the heads'
        defaults (one threshold for all, or one per layer); ``max_inflight`` caps unverified
        early tokens per sequence.
        """
        from transformers import AutoTokenizer

        resolved, config, ranges = _prepare(source, stages, split_points, dtype, max_seq_len, cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(resolved.path))
        heads_path = resolve_heads(heads, resolved)
        built = [
            build_stage(
                resolved, config, ranges, i, dtype=dtype, max_seq_len=max_seq_len,
                heads=heads_path, exit_layers=exit_layers, thresholds=thresholds,
            )
            for i in range(len(ranges))
        ]
        return cls(resolved, config, tokenizer, built, max_seq_len, max_inflight)

    @property
    def layer_ranges(self) -> list[tuple[int, int]]:
        return [(s.start, s.end) for s in self.stages]

    def encode(self, prompt: str | list[dict], chat: bool = False) -> list[int]:
        """Token ids of a prompt; ``chat`` (or a message list) goes through the chat template."""
        if isinstance(prompt, list) or chat:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError(f"the tokenizer of {self.resolved.origin} has no chat template; drop --chat")
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False).input_ids
        return self.tokenizer(prompt).input_ids

    def generate(
        self,
        prompt: str | list[dict] | list[int],
        *,
        max_new_tokens: int = 128,
        chat: bool = False,
        stop: Sequence[str] = (),
        early_exit: str = "off",
        on_text: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        """Greedy-decode ``prompt`` (text, chat messages, or token ids); ``on_text`` streams verified text."""
        if early_exit not in EARLY_EXIT_MODES:
            raise ValueError(f"early_exit `{early_exit}` is unknown; use one of {', '.join(EARLY_EXIT_MODES)}")
        if early_exit != "off" and not any(stage.heads is not None for stage in self.stages):
            raise ValueError(
                f"early_exit `{early_exit}` needs exit heads and {self.resolved.origin} has none loaded; "
                "train them with `adadecode train-heads` and set decoding.heads, or use early_exit `off`"
            )
        for stage in self.stages:
            stage.policy = early_exit
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            ids = list(prompt)
        else:
            ids = self.encode(prompt, chat)
        need = len(ids) + max_new_tokens
        if need > self.max_seq_len:
            raise CacheOverflowError(
                f"the prompt ({len(ids)} tokens) plus max_new_tokens ({max_new_tokens}) needs {need} positions "
                f"but the KV cache holds {self.max_seq_len}; raise model.max_seq_len or shorten the request"
            )
        criteria = StopCriteria(
            max_new_tokens=max_new_tokens,
            eos_token_ids=self.eos_token_ids,
            stop_strings=tuple(stop),
            decode=self._decode if stop else None,
        )
        seq = self._next_seq
        self._next_seq += 1
        coord = Coordinator(max_inflight=0 if early_exit == "off" else self.max_inflight)
        coord.add_sequence(seq, ids, criteria)

        streamer = _TextStreamer(self._decode, stop, on_text)
        busy0 = list(self.runner.busy_s)
        t0 = time.perf_counter()
        self.runner.run(coord, on_verified=streamer.push)
        elapsed = time.perf_counter() - t0
        streamer.flush()

        s = coord.sequences[seq]
        tokens = s.generated
        text = self._decode(tokens)
        if stop:
            text = trim_at_stop_string(text, stop)
        busy = [b - b0 for b, b0 in zip(self.runner.busy_s, busy0)]
        return GenerationResult(
            prompt_tokens=len(ids),
            tokens=tokens,
            text=text,
            finish_reason=s.finish_reason,
            tokens_per_s=len(tokens) / elapsed if elapsed > 0 else 0.0,
            stats={
                "elapsed_s": elapsed,
                "stages": self.layer_ranges,
                "stage_busy_fraction": [b / elapsed if elapsed > 0 else 0.0 for b in busy],
                "early_emitted": s.stats.early_emitted,
                "accepted": s.stats.accepted,
                "rollbacks": s.stats.rollbacks,
                "early_by_layer": dict(sorted(s.stats.early_by_layer.items())),
                "early_exit": early_exit,
            },
        )

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def build_stage(
    resolved: ResolvedModel,
    config,
    ranges: Sequence[tuple[int, int]],
    index: int,
    *,
    dtype: str = "float32",
    max_seq_len: int = 2048,
    heads: Path | None = None,
    exit_layers: Sequence[int] = (),
    thresholds: Sequence[float] = (),
    policy: str = "off",
) -> Stage:
    """Load stage ``index`` of ``ranges`` and only its weights: what one rank of a pipeline holds.

    A stage loads the final norm and LM head when it is the last, or when one of the exit
    heads it evaluates (layers in ``(a, b]``) needs them (DESIGN.md invariant 5).
    """
    a, b = ranges[index]
    last = index == len(ranges) - 1
    args = ModelArgs.from_hf_config(config)
    stage_heads = None
    if heads is not None:
        from .exit_heads import read_manifest

        manifest = read_manifest(heads)
        layers = list(exit_layers) or list(manifest["default_layers"])
        mine = [l for l in layers if a < l <= b and l < args.num_layers]
    else:
        mine = []
    modules = load_stage_modules(
        resolved.path, config, a, b, embed=index == 0, head=last or bool(mine), dtype=DTYPES[dtype]
    )
    if mine:
        from .exit_heads import load_exit_heads

        stage_heads = load_exit_heads(
            heads, fingerprint=resolved.fingerprint, config=config,
            norm=modules.norm, lm_head_weight=modules.lm_head.weight,
        ).select(layers=mine, thresholds=_thresholds_for(layers, thresholds, mine))
    model = StageModel(modules, args, max_seq_len)
    return Stage(index, len(ranges), model, heads=stage_heads, policy=policy)


def resolve_heads(heads: str | Path | None, resolved: ResolvedModel) -> Path | None:
    """The exit-heads directory ``heads`` names: ``auto`` is the shipped heads of the bundled model."""
    if heads is None or str(heads) in ("", "none"):
        return None
    if str(heads) == "auto":
        from .exit_heads import bundled_heads_path

        if not resolved.origin.startswith("bundled:"):
            return None
        path = bundled_heads_path(resolved.origin.split(":", 1)[1])
        return path if path.exists() else None
    path = Path(heads).expanduser()
    if not (path / "manifest.json").exists():
        raise ValueError(
            f"exit heads `{heads}`: no manifest.json there; point decoding.heads at the directory "
            "`adadecode train-heads --out DIR` wrote, or use `auto` / `none`"
        )
    return path


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


def _prepare(source, stages, split_points, dtype, max_seq_len, cache_dir):
    """What every loader does first: check the dtype, resolve the model, check the cache size
    and plan the stages (a pure function, so every rank computes the same ranges)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype `{dtype}` is not supported; use one of {', '.join(DTYPES)}")
    resolved = resolve_model(source, cache_dir)
    config = load_hf_config(resolved.path)
    _check_seq_len(config, ModelArgs.from_hf_config(config), max_seq_len)
    return resolved, config, plan_stages(config, stages, split_points)


def plan_stages(config, stages: int, split_points: Sequence[int] = ()) -> list[tuple[int, int]]:
    """Layer ranges per stage; automatic splits balance the weights read per decoded token."""
    args = ModelArgs.from_hf_config(config)
    layer = args.layer_params(config.intermediate_size)
    lm_head = args.vocab_size * args.hidden_size
    # The embedding is one row gathered per token; the LM head is a full matrix read.
    return partition_layers(args.num_layers, stages, split_points, last_extra=lm_head / layer)


def _check_seq_len(config, args: ModelArgs, max_seq_len: int) -> None:
    if max_seq_len > args.max_position_embeddings:
        raise ValueError(
            f"model.max_seq_len {max_seq_len} exceeds the model's max_position_embeddings "
            f"({args.max_position_embeddings}); lower model.max_seq_len"
        )
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and max_seq_len > window:
        raise ValueError(
            f"model.max_seq_len {max_seq_len} exceeds the model's sliding window ({window}), which "
            f"adadecode does not implement; set model.max_seq_len <= {window}"
        )


def _eos_ids(path: Path, config, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    gen = Path(path) / "generation_config.json"
    candidates = [getattr(config, "eos_token_id", None), tokenizer.eos_token_id]
    if gen.exists():
        import json

        candidates.append(json.loads(gen.read_text()).get("eos_token_id"))
    for c in candidates:
        if isinstance(c, int):
            ids.add(c)
        elif isinstance(c, (list, tuple)):
            ids.update(int(x) for x in c)
    return frozenset(ids)


class _TextStreamer:
    """Turns verified token ids into text deltas, holding back what may still be a stop string."""

    def __init__(self, decode, stop: Sequence[str], on_text):
        self.decode, self.stop, self.on_text = decode, tuple(stop), on_text
        self.ids: list[int] = []
        self.sent = 0

    def push(self, event: Verified) -> None:
        self.ids.extend(event.tokens)
        if self.on_text is not None:
            self._emit(final=False)

    def flush(self) -> None:
        if self.on_text is not None:
            self._emit(final=True)

    def _emit(self, final: bool) -> None:
        text = self.decode(self.ids)
        if self.stop:
            text = trim_at_stop_string(text, self.stop)
        hold = 0 if final else max((len(s) for s in self.stop), default=0)
        if not final and text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its rest
            hold = max(hold, 1)
        upto = max(self.sent, len(text) - hold)
        if upto > self.sent:
            self.on_text(text[self.sent : upto])
            self.sent = upto


# --- one rank of a multi-process pipeline (runners/distributed.py) ----------------------


def load_rank(
    source: str,
    *,
    rank: int,
    stages: int,
    split_points: Sequence[int] = (),
    dtype: str = "float32",
    max_seq_len: int = 2048,
    cache_dir: str | Path | None = None,
    heads: str | Path | None = "auto",
    exit_layers: Sequence[int] = (),
    thresholds: Sequence[float] = (),
) -> tuple[ResolvedModel, object, list[tuple[int, int]], Stage]:
    """What rank ``rank`` of a ``stages``-rank pipeline loads: ``(resolved, config, ranges, its stage)``.

    Every rank computes the same ``ranges`` (``plan_stages`` is a pure function)
    and reads only its own stage's weights (and exit heads); the arguments are
    ``Engine.load``'s.
    """
    resolved, config, ranges = _prepare(source, stages, split_points, dtype, max_seq_len, cache_dir)
    stage = build_stage(
        resolved, config, ranges, rank, dtype=dtype, max_seq_len=max_seq_len,
        heads=resolve_heads(heads, resolved), exit_layers=exit_layers, thresholds=thresholds,
    )
    return resolved, config, ranges, stage


class PipelineEngine(Engine):
    """Rank 0 of a multi-rank pipeline: tokenizer, coordinator and stage 0 here; later stages on other ranks.

    ``runner`` is a ``DistributedRunner`` connected to the other ranks; its
    ``stages`` are stage 0 plus a ``RemoteStage`` view of each other rank's, so
    ``generate`` is ``Engine.generate`` unchanged. Call ``runner.close()`` when done.
    """

    def __init__(self, resolved: ResolvedModel, config, runner, max_seq_len: int, max_inflight: int = 2):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(resolved.path))
        super().__init__(resolved, config, tokenizer, runner.stages, max_seq_len, max_inflight)
        self.runner = runner
