"""The Python API: load a model once as pipeline stages, generate many times.

    from adadecode.runtime import Engine
    engine = Engine.load("bundled:smollm2-135m-instruct", stages=2)
    result = engine.generate("Write a haiku about the sea.", max_new_tokens=64, chat=True)
    print(result.text, result.tokens_per_s)

``Engine`` wires the tokenizer, the Coordinator and the Stages to a runner; it
takes plain arguments, so the launcher maps each config section onto them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .coordinator import Coordinator, gets_drafts, gets_guesses
from .detokenize import TextStream
from .device import check_placement
from .draft_table import DraftTable
from .generation_config import GenerationDefaults, read_generation_config
from .hf_adapter import ModelArgs
from .loading import LoadedStage, LoadSpec, build_stage, prepare, resolve_draft_table
from .model_source import ResolvedModel
from .params import EARLY_EXIT_MODES, SamplingParams, check_request
from .run_stats import GenerationStats, RunTotals
from .runners.inprocess import LocalRunner
from .sampling import TokenLogprobs
from .stage import Stage
from .stopping import StopCriteria, trim_at_stop_string

log = logging.getLogger("adadecode.engine")

DEFAULT_MAX_INFLIGHT = 2  # where it is not chosen with the heads


@dataclass
class GenerationResult:
    prompt_tokens: int
    tokens: list[int]  # generated ids, EOS / stop token included
    text: str
    finish_reason: str
    tokens_per_s: float
    stats: dict = field(default_factory=dict)  # JSON-ready: the counters below, the settings, the derived numbers
    counters: GenerationStats = field(default_factory=GenerationStats, repr=False)  # typed: add these up (RunTotals)
    logprobs: list[TokenLogprobs] = field(default_factory=list, repr=False)  # per token, when sampling.logprobs
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list, repr=False)  # prompt tokens 1 .., when asked

    def as_dict(self) -> dict:
        """JSON-ready (``stats`` holds the counters; log probabilities only when asked for)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("counters", "logprobs", "prompt_logprobs")}
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name):
                out[name] = [dataclasses.asdict(lp) for lp in getattr(self, name)]
        return out


class Engine:
    """Tokenizer, coordinator and a runner over the pipeline's stages (``LocalRunner``: all in this
    process; ``DistributedRunner``: stage 0 here, the rest on other ranks)."""

    def __init__(
        self, resolved: ResolvedModel, config, tokenizer, runner, max_seq_len: int, max_inflight: int = 2,
        heads_choice=None, generation_config: str = "auto", lookup: int = 0, draft: int = 0,
        table: DraftTable | None = None,
    ):
        self.resolved = resolved
        self.config = config
        self.args = ModelArgs.from_hf_config(config)
        self.tokenizer = tokenizer
        self.runner = runner
        self.stages: list[Stage] = runner.stages
        self.max_seq_len = max_seq_len
        # the model's generation_config.json (``generation_config``: auto, none, or a directory):
        # its EOS ids end generation here; its sampling defaults are the launcher's to apply
        # (launcher/config/loader.py), since a call here samples only when asked to
        self.generation_defaults = read_generation_config(resolved.path, generation_config)
        self.eos_token_ids = _eos_ids(config, tokenizer, self.generation_defaults)
        self.max_inflight = max_inflight
        self.lookup = lookup  # the context lookup's shortest match (runtime/context_lookup.py); 0: off
        self.draft = draft  # the most lookup drafts a greedy decode request carries (coordinator.py); 0: none
        self.table = table  # where the sequence has no match, drafts from the model's own answers (draft_table.py)
        # The heads chosen for this setting (runtime/sim/heads.py), or None: the config's / manifest's.
        # A choice of none means no head pays here, and early exit runs as off.
        self.heads_choice = heads_choice
        self._next_seq = 0

    @classmethod
    def load(cls, source: str | LoadSpec = "bundled:smollm2-135m-instruct", **spec) -> Engine:
        """Resolve the model, split its layers into stages, choose the heads and load every stage in this process.

        ``source`` is a ``LoadSpec`` or a model source; keyword arguments are ``LoadSpec`` fields:
        ``stages``, ``split_points``, ``device`` (auto, cpu, cuda, cuda:N), ``dtype`` (auto:
        bfloat16 on CUDA, float32 on the CPU), ``max_seq_len``, ``cache_dir``, ``heads`` (a
        directory of exit heads, ``"auto"``: the heads shipped for the bundled model, or None),
        ``exit_layers`` / ``thresholds`` (override the heads' defaults: one threshold for all, or
        one per layer), ``compile`` (auto, on, off), ``max_inflight`` (unverified early tokens
        per sequence; 0: chosen with the heads), ``generation_config`` (auto: the model's
        generation_config.json, whose EOS ids end generation; none; or a directory holding one).
        """
        from transformers import AutoTokenizer

        spec = source.replace(**spec) if isinstance(source, LoadSpec) else LoadSpec(source, **spec)
        device, dtype = check_placement(spec.device, spec.dtype, "inprocess")
        resolved, config, ranges = prepare(spec)
        spec, choice = _plan(spec, resolved, config, ranges, device, dtype, ranks=False)
        table = resolve_draft_table(spec, resolved, config)  # before the weights: a bad table fails fast
        tokenizer = AutoTokenizer.from_pretrained(str(resolved.path))
        built = [build_stage(spec, resolved, config, ranges, i, device=device, dtype=dtype) for i in range(len(ranges))]
        return cls(resolved, config, tokenizer, LocalRunner([b.stage for b in built]), spec.max_seq_len,
                   spec.max_inflight, heads_choice=choice, generation_config=spec.generation_config,
                   lookup=spec.lookup, draft=spec.draft, table=table)

    @property
    def heads_loaded(self) -> bool:
        return any(stage.heads is not None for stage in self.stages)

    @property
    def early_exit_off_here(self) -> bool:
        """The heads were chosen for this setting and none pays: early exit runs as off."""
        return self.heads_choice is not None and not self.heads_choice.layers

    def early_exit_for(self, mode: str, sampling: SamplingParams | None = None) -> str:
        """The early-exit mode a request for ``mode`` runs with: ``mode`` for a sequence that gets the
        lookup's drafts (greedy, ``drafts_for``); else off where no head pays (the choice's note said
        so at start-up) or none is loaded beside the drafts, and off for a sequence the context lookup
        makes no guesses for (sampled: ``sampling``) where the heads were chosen with the guesses and
        pay only with them; else ``mode``."""
        if mode not in EARLY_EXIT_MODES:
            return mode
        if self.drafts_for(sampling):
            return mode  # its drafts pay with heads or without
        if self.draft and not self.heads_loaded:
            return "off"  # the drafts are all there is, and this sequence gets none (sampled)
        needs = self.heads_choice is not None and self.heads_choice.needs_lookup
        return "off" if self.early_exit_off_here or (needs and not gets_guesses(self.lookup, sampling)) else mode

    def drafts_for(self, sampling: SamplingParams | None) -> bool:
        """Whether a sequence with early exit and these sampling parameters gets the context lookup's
        drafts (greedy only: coordinator.gets_drafts)."""
        return gets_drafts(self.draft, self.lookup, sampling)

    def starts_early(self, sampling: SamplingParams | None) -> bool:
        """Whether a sequence with these sampling parameters has anything to start tokens early
        with: exit heads, or the lookup's drafts."""
        return self.heads_loaded or self.drafts_for(sampling)

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
        sampling: SamplingParams | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        min_p: float | None = None,
        seed: int | None = None,
        sampling_mode: str | None = None,
        ignore_eos: bool = False,
        min_tokens: int = 0,
    ) -> GenerationResult:
        """Decode ``prompt`` (text, chat messages, or token ids); ``on_text`` streams verified text.

        Greedy by default. To sample, pass ``sampling=SamplingParams(...)`` or its fields as
        keywords (``temperature``, ``top_p``, ``top_k``, ``min_p``, ``seed``, and
        ``sampling_mode``: seeded or speculative; runtime/sampling.py); temperature 0 is greedy.
        ``early_exit`` and the sampling parameters travel with the sequence to every stage (no
        stage setting changes). Whatever ends the call — an error, an interrupt, ``on_text``
        raising — the sequence's cache slot is freed on every stage before the error goes on.
        ``ignore_eos`` and ``min_tokens`` act as the server's (runtime/stopping.py); penalties and
        log probabilities are ``SamplingParams`` fields (the result's ``logprobs``, ``prompt_logprobs``).
        """
        fields = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p, "seed": seed,
                  "mode": sampling_mode}
        given = {k: v for k, v in fields.items() if v is not None}
        if sampling is not None and given:
            raise ValueError(f"give sampling=SamplingParams(...) or its fields ({', '.join(given)}), not both")
        if sampling is None and given:
            sampling = SamplingParams(**given)
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            ids = list(prompt)
        else:
            ids = self.encode(prompt, chat)
        early_exit = self.early_exit_for(early_exit, sampling)
        check_request(len(ids), max_new_tokens, early_exit, sampling, max_seq_len=self.max_seq_len,
                      heads_loaded=self.starts_early(sampling), model=self.resolved.origin)
        criteria = StopCriteria(
            max_new_tokens=max_new_tokens,
            eos_token_ids=self.eos_token_ids,
            stop_strings=tuple(stop),
            decode=self._decode if stop else None,
            min_new_tokens=min_tokens,
            ignore_eos=ignore_eos,
        )
        seq = self._next_seq
        coord = Coordinator(max_inflight=self.max_inflight, lookup=self.lookup, draft=self.draft, table=self.table)
        coord.add_sequence(seq, ids, criteria, early_exit=early_exit, sampling=sampling)
        self._next_seq += 1  # only ids that reach the stages: gapless ids keep their finished sets small

        shown: list[str] = []  # the stream's text: with min_tokens, a stop string early in it is text

        def emit(text: str) -> None:
            shown.append(text)
            if on_text is not None:
                on_text(text)

        stream = TextStream(self._decode, stop, emit, min_tokens=min_tokens)
        logprobs: list[TokenLogprobs] = []
        prompt_logprobs: list[TokenLogprobs] = []

        def on_verified(event) -> None:
            stream.push(event.tokens)
            logprobs.extend(event.logprobs)
            prompt_logprobs.extend(event.prompt_logprobs)

        busy0 = list(self.runner.busy_s)
        stages0 = [st.stats.copy() for st in self.stages]
        compiled0 = self.compile_s
        t0 = time.perf_counter()
        self.runner.run(coord, on_verified=on_verified)
        elapsed = time.perf_counter() - t0
        stream.flush()

        s = coord.sequences[seq]
        tokens = s.generated
        text = self._decode(tokens)
        if stop:
            text = "".join(shown) if min_tokens else trim_at_stop_string(text, stop)
        # Remote stages' counters are as of their `released` answers, which run() waits for.
        counters = GenerationStats.of(
            [s.stats], elapsed_s=elapsed, stage_busy_s=[b - b0 for b, b0 in zip(self.runner.busy_s, busy0)],
            stage_stats=[st.stats - st0 for st, st0 in zip(self.stages, stages0)],
        )
        totals = RunTotals().add(len(tokens), counters)
        stats = {"elapsed_s": elapsed, "seq": seq, "stages": self.layer_ranges,
                 "stage_busy_fraction": totals.stage_busy_fraction}
        stats |= counters.as_dict()  # elapsed_s keeps its place; stage_busy_s, the early-exit and stage counters
        stats |= {
            "early_exit": early_exit,
            "sampling": None if sampling is None or sampling.plain_greedy else dataclasses.asdict(sampling),
            "compile_s": self.compile_s - compiled0,  # spent compiling in this call (first calls only)
        }
        derived = totals.summary()
        stats |= {k: derived[k] for k in (
            "exit_rate_per_head", "precision_per_head", "acceptance_rate", "lookup_rate", "lookup_acceptance",
            "draft_rate", "table_rate", "table_acceptance", "discarded_fraction", "stage_merged",
            "stage_idle_backfills",
        )}
        return GenerationResult(
            prompt_tokens=len(ids),
            tokens=tokens,
            text=text,
            finish_reason=s.finish_reason,
            tokens_per_s=totals.tokens_per_s,
            stats=stats,
            counters=counters,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )

    def new_sequence_id(self) -> int:
        """A sequence id no stage has seen: ids are used once, handed out in increasing order."""
        seq = self._next_seq
        self._next_seq += 1
        return seq

    @property
    def num_slots(self) -> int:
        """Sequences each stage can hold at once (KV cache slots; ``LoadSpec.num_slots``)."""
        return min(s.model.num_slots for s in self.stages if getattr(s, "model", None) is not None)

    @property
    def compiled(self) -> bool:
        """Whether this process's stages run the compiled layer loop (runtime/compiled_step.py): every
        stage of a job is loaded with the same setting."""
        return any(getattr(s, "model", None) is not None and s.model.step is not None for s in self.stages)

    @property
    def compile_s(self) -> float:
        """Seconds this process's stages have spent compiling (runtime/compiled_step.py)."""
        return sum(s.model.step.compile_s for s in self.stages if getattr(s, "model", None) and s.model.step)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _eos_ids(config, tokenizer, generation: GenerationDefaults) -> frozenset[int]:
    """config.json's, the tokenizer's and the generation config's EOS ids (as transformers' and
    vLLM's stop tokens: the last lists the end-of-turn tokens of Llama 3 and Gemma 3)."""
    ids: set[int] = set(generation.eos_token_ids)
    for c in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(c, int):
            ids.add(c)
        elif isinstance(c, (list, tuple)):
            ids.update(int(x) for x in c)
    return frozenset(ids)


# --- one rank of a multi-process pipeline (runners/distributed.py) ----------------------------


def load_rank(
    spec: LoadSpec, *, rank: int, backend: str = "gloo", local_rank: int = 0, local_world_size: int = 1
) -> tuple[ResolvedModel, object, list[tuple[int, int]], LoadedStage]:
    """What rank ``rank`` of a ``spec.stages``-rank pipeline loads: ``(resolved, config, ranges, its
    stage)``, the heads chosen for the setting first (every rank chooses the same: it is deterministic)."""
    device, dtype = check_placement(
        spec.device, spec.dtype, backend, local_rank=local_rank, local_world_size=local_world_size
    )
    resolved, config, ranges = prepare(spec)
    spec, choice = _plan(spec, resolved, config, ranges, device, dtype, ranks=True)
    table = resolve_draft_table(spec, resolved, config) if rank == 0 else None  # the Coordinator's; fails fast
    loaded = build_stage(spec, resolved, config, ranges, rank, device=device, dtype=dtype)
    loaded.heads_choice, loaded.max_inflight, loaded.lookup = choice, spec.max_inflight, spec.lookup
    loaded.draft, loaded.table = spec.draft, table
    return resolved, config, ranges, loaded


def _plan(spec: LoadSpec, resolved, config, ranges, device, dtype, *, ranks: bool):
    """The heads for this setting, and ``max_inflight`` where it is left to them (0), before any
    weight is loaded (runtime/sim/heads.py)."""
    spec = spec.replace(draft=spec.drafts(device.type))
    choice = None
    if spec.chooses_heads and spec.draft:
        # The choice does not model drafts, and where they run (compiled on the CPU) heads chosen
        # without them added nothing on top on 2 ranks (docs/results.md, Lookup drafts).
        log.info("the context lookup's drafts run here (up to %d a step, greedy requests); no exit heads "
                 "are chosen with them, so sampled requests run early exit off", spec.draft)
        spec = spec.replace(heads=None, auto_heads_for=None)
    elif spec.auto_heads_for not in (None, "off"):
        from .sim.heads import plan_heads

        spec, choice = plan_heads(spec, resolved, config, ranges, device, dtype, ranks=ranks)
        if choice is not None:  # a user who turned early exit on is told when it stays off
            (log.info if choice.layers else log.warning)("%s", choice.note)
    if spec.max_inflight == 0:
        spec = spec.replace(max_inflight=choice.max_inflight if choice is not None else DEFAULT_MAX_INFLIGHT)
    return spec, choice


# --- rank 0 of a multi-process pipeline (runners/distributed.py) ----------------------------


class PipelineEngine(Engine):
    """Rank 0 of a multi-rank pipeline: tokenizer, coordinator and stage 0 here; later stages on other ranks.

    ``runner`` is a ``DistributedRunner`` connected to the other ranks; its
    ``stages`` are stage 0 plus a ``RemoteStage`` view of each other rank's, so
    ``generate`` is ``Engine.generate`` unchanged. Call ``runner.close()`` when done.
    """

    def __init__(self, resolved: ResolvedModel, config, runner, max_seq_len: int, max_inflight: int = 2,
                 heads_choice=None, generation_config: str = "auto", lookup: int = 0, draft: int = 0,
                 table: DraftTable | None = None):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(resolved.path))
        super().__init__(resolved, config, tokenizer, runner, max_seq_len, max_inflight, heads_choice,
                         generation_config, lookup, draft, table)
