"""The run configuration's schema: one dataclass per section, each validating itself.

The schema is nested dataclasses, one per section, as in torchtitan's
``JobConfig``. Every field has a type, a default and a one-line docstring
directly beneath it; ``field_docs()`` reads those docstrings back out of this
file's source, so the schema is the only place an option is documented.

Each section validates itself in ``__post_init__`` and every failure is a
``ConfigError`` naming the dotted key, the bad value, what is allowed and how
to fix it. Components receive only their own section (``cfg.pipeline``), never
the root config. Request-level values (modes, devices, sampling bounds) are
checked by runtime/params.py, the one place that defines them.
"""

import ast
import dataclasses
import difflib
import inspect
import math
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from adadecode.runtime.context_lookup import MAX_DRAFT, MAX_MATCH
from adadecode.runtime.params import DEVICE_PATTERN, BatchingMode, EarlyExitMode


class ConfigError(ValueError):
    """A configuration value, file or flag is invalid; the message says how to fix it."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key  # dotted key at fault, so the loader can say where it was set


# --------------------------------------------------------------------------- schema


@dataclass
class ModelConfig:
    """Which model to run and how its weights and KV cache are laid out."""

    source: str = "bundled:smollm2-135m-instruct"
    """Model to load: `bundled:<name>`, a Hugging Face model directory, or a `.gguf` file."""

    device: str = "auto"
    """Where each stage computes: auto (cuda:LOCAL_RANK when CUDA is available, else cpu), cpu, cuda, cuda:N."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype of weights, activations and KV cache; auto: bfloat16 on CUDA, float32 on the CPU."""

    max_seq_len: int = 2048
    """KV cache capacity in positions, prompt plus generated tokens."""

    revision: str = ""
    """A Hub id's branch, tag or commit (model.source org/name); empty: main."""

    generation_config: str = "auto"
    """The model's decoding defaults: auto (its generation_config.json: EOS ids, and sampling where it sets
    do_sample), none (ignore it), or a directory holding one; set keys win."""

    cache_dir: str = ""
    """Where converted GGUF weights are kept; empty means $ADADECODE_CACHE or ~/.cache/adadecode."""

    def __post_init__(self) -> None:
        _check_types(self)
        if self.source.strip() == "":
            raise _invalid(
                "model.source", self.source, "a non-empty model source",
                "use e.g. `--model.source=bundled:smollm2-135m-instruct` or a path to a model directory or .gguf file",
            )
        if not DEVICE_PATTERN.match(self.device):
            raise _invalid(
                "model.device", self.device, "auto, cpu, cuda or cuda:N",
                "use e.g. `--model.device=cuda:0`, or auto for one GPU per rank when CUDA is available",
            )
        if self.generation_config.strip() == "":
            raise _invalid(
                "model.generation_config", self.generation_config, "auto, none, or a directory holding a "
                "generation_config.json", "use `--generation-config auto` (the model's own) or `none`",
            )
        if self.max_seq_len < 2:
            raise _invalid(
                "model.max_seq_len", self.max_seq_len, "an integer >= 2 (one prompt token plus one generated token)",
                "set e.g. `--model.max_seq_len=2048`",
            )


@dataclass
class PipelineConfig:
    """How the decoder layers are cut into pipeline stages."""

    stages: int = 1
    """Number of pipeline stages, one per rank; 1 runs the whole model in one stage."""

    split_points: list[int] = field(default_factory=list)
    """First layer index of stages 1..P-1, e.g. [10, 20]; empty means an automatic cost-balanced split."""

    threads: int = 0
    """Torch intra-op threads per rank; 0: torch's default in one process, 1 per rank in a multi-rank run."""

    pin_cpus: bool = True
    """Multi-rank runs: pin local rank i to its own cores (threads per rank each) when the node has enough."""

    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile each stage's layer loop (CUDA graphs on GPUs); auto: on CUDA, and on every device for `serve`
    and `bench`, whose runs repay the minutes a CPU compile takes at load (docs/results.md)."""

    compile_warmup: bool = True
    """With compile: compile every chunk shape (1 to max_inflight + 1 rows, merged chunks, fused batches, the LM
    head) at load, so that no generation or request pays a compile midway; false: each on first use."""

    row_invariant: Literal["auto", "on", "off"] = "auto"
    """Merged rows (deferred chunks, fused batches) get the bits they get alone; auto: GEMM rows share a call
    where the kernel is row-invariant, on: each op per plain decoding's call, off: shared calls (docs/exactness.md)."""

    def __post_init__(self) -> None:
        _check_types(self)
        if self.stages < 1:
            raise _invalid(
                "pipeline.stages", self.stages, "an integer >= 1",
                "set it to the number of pipeline ranks, e.g. `--pipeline.stages=2`",
            )
        if self.threads < 0:
            raise _invalid(
                "pipeline.threads", self.threads, "an integer >= 0",
                "set a thread count, or `--pipeline.threads=0` to keep torch's default",
            )
        sp = self.split_points
        if not sp:
            return
        if len(sp) != self.stages - 1:
            raise _invalid(
                "pipeline.split_points", sp,
                f"{self.stages - 1} entries for pipeline.stages = {self.stages} "
                "(the first layer of each stage after the first)",
                f"set `--pipeline.stages={len(sp) + 1}` to match, change the split points, "
                "or use `--pipeline.split_points=[]` for an automatic split",
            )
        if sp[0] < 1:
            raise _invalid(
                "pipeline.split_points", sp, "split points >= 1 (stage 0 must own at least layer 0)",
                "drop the 0 or leave split_points empty for an automatic split",
            )
        for a, b in zip(sp, sp[1:]):
            if b <= a:
                raise _invalid(
                    "pipeline.split_points", sp,
                    f"strictly increasing layer indices (found {a} then {b}), so that no stage is empty",
                    "list each stage's first layer in ascending order, e.g. `--pipeline.split_points=10,20`",
                )


@dataclass
class DecodingConfig:
    """What to generate and when to stop."""

    max_new_tokens: int = 128
    """Most tokens to generate after the prompt."""

    early_exit: EarlyExitMode = "off"
    """Early exit: off (plain greedy), eager (bit-exact backfill) or deferred (batched backfill)."""

    heads: str = "auto"
    """Exit heads directory (from `adadecode train-heads`); auto: the heads shipped for the bundled model; none."""

    exit_layers: list[int] = field(default_factory=list)
    """Head layers to use, a subset of the heads' layers; empty: chosen per setting (auto_heads) or the
    heads' defaults."""

    thresholds: list[float] = field(default_factory=list)
    """Confidence thresholds: one for every head, or one per exit layer; empty: as exit_layers."""

    auto_heads: bool = True
    """With exit_layers and thresholds empty: heads chosen for this setting by the simulator, none where none pays
    or where the lookup's drafts run."""

    max_inflight: int = 0
    """Most unverified early tokens per sequence in flight at once; 0: chosen with the heads (else 2)."""

    lookup: int = 3
    """Context lookup: an item whose last tokens match at least this many tokens earlier in the
    sequence exits at its first head with the token that followed them (greedy only); drafts take
    a match of any length; 0: off (no guesses, no drafts)."""

    draft: int = -1
    """With lookup: the most tokens of the lookup's continuation a decode step carries as drafts, verified
    in the same pass (greedy with early exit on); 0: none; -1: 3 where a chunk of decode rows costs about
    one row (compiled on the CPU, or row_invariant off), else none."""

    draft_table: str = "auto"
    """Where drafts run and the sequence has no match: a table of the model's own answers that drafts
    (`adadecode build-draft-table`, a .safetensors file); auto: the table shipped for the bundled model; none."""

    stop: list[str] = field(default_factory=list)
    """Stop strings: generation ends once the verified text contains any of them."""

    chat: bool = False
    """Wrap the prompt in the tokenizer's chat template."""

    def __post_init__(self) -> None:
        _check_types(self)
        if self.max_new_tokens < 1:
            raise _invalid(
                "decoding.max_new_tokens", self.max_new_tokens, "an integer >= 1",
                "set e.g. `--decoding.max_new_tokens=128`",
            )
        if self.max_inflight < 0:
            raise _invalid(
                "decoding.max_inflight", self.max_inflight, "an integer >= 0 (0: chosen with the heads)",
                "set e.g. `--decoding.max_inflight=2` (early_exit off ignores it)",
            )
        if not 0 <= self.lookup <= MAX_MATCH:
            raise _invalid(
                "decoding.lookup", self.lookup, f"an integer from 0 (off) to {MAX_MATCH}, the longest match looked up",
                "set e.g. `--decoding.lookup=3` (a match of 3 tokens or more)",
            )
        if not -1 <= self.draft <= MAX_DRAFT:
            raise _invalid(
                "decoding.draft", self.draft,
                f"an integer from 0 (no drafts) to {MAX_DRAFT}, or -1 (chosen for the setting)",
                "set e.g. `--decoding.draft=3`",
            )
        if self.draft_table not in ("auto", "none") and not self.draft_table.endswith(".safetensors"):
            raise _invalid(
                "decoding.draft_table", self.draft_table,
                "auto, none, or the .safetensors file `adadecode build-draft-table --out FILE` wrote",
                "set e.g. `--decoding.draft_table=none`",
            )
        for t in self.thresholds:
            if not 0.0 <= t < 1.0:
                raise _invalid(
                    "decoding.thresholds", self.thresholds,
                    "confidences in [0, 1) (a head emits when its top probability exceeds it)",
                    "set e.g. `--decoding.thresholds=0.9` or one value per exit layer",
                )
        if self.thresholds and self.exit_layers and len(self.thresholds) not in (1, len(self.exit_layers)):
            raise _invalid(
                "decoding.thresholds", self.thresholds,
                f"one value, or one per exit layer ({len(self.exit_layers)} in decoding.exit_layers)",
                "give a single threshold or match decoding.exit_layers",
            )
        for s in self.stop:
            if s == "":
                raise _invalid(
                    "decoding.stop", self.stop, "non-empty stop strings (an empty one would match at once)",
                    "remove the empty string from the list",
                )


@dataclass
class SamplingConfig:
    """Sampling (runtime/sampling.py); temperature 0 is greedy decoding, the parity reference.

    The ranges are ``SamplingParams``' (runtime/params.py, which imports no torch): one
    definition for the config, the server and the runtime.
    """

    temperature: float = 0.0
    """Softmax temperature; 0: greedy decoding (the other sampling keys are then unused)."""

    top_p: float = 1.0
    """Keep the most likely tokens until their probability reaches top_p, in (0, 1]; 1: off."""

    top_k: int = 0
    """Keep the top_k most likely tokens; 0: off."""

    min_p: float = 0.0
    """Keep tokens at least min_p times as likely as the most likely one, in [0, 1]; 0: off."""

    seed: int = 0
    """Seed of the per-position noise: the token at position p depends on (seed, p) only, in [0, 2**63 - 1]."""

    mode: Literal["seeded", "speculative"] = "seeded"
    """seeded: output independent of early exit and stages; speculative: heads' draws kept with min(1, p/q)."""

    def __post_init__(self) -> None:
        from adadecode.runtime.params import SamplingParams

        _check_types(self)
        examples = {"temperature": "--temperature 0.8", "top_p": "--top-p 0.95", "top_k": "--top-k 50",
                    "min_p": "--min-p 0.05", "seed": "--seed 1", "mode": "--sampling seeded"}
        try:
            SamplingParams(**dataclasses.asdict(self))
        except ValueError as e:
            key = next(k for k in examples if str(e).startswith(f"sampling parameter {k} ="))
            expected = str(e).split("is invalid: expected ", 1)[1]
            raise _invalid(f"sampling.{key}", getattr(self, key), expected, f"set e.g. `{examples[key]}`") from None


@dataclass
class TransportConfig:
    """How stages talk to each other."""

    backend: Literal["inprocess", "gloo", "nccl", "auto"] = "auto"
    """inprocess: all stages in one process; gloo / nccl: one CPU / GPU rank per stage; auto: inprocess for
    1 stage, else gloo."""

    timeout_s: float = 60.0
    """Every wait on another rank gives up after this many seconds; a rank silent for 80% of it is declared hung."""

    join_timeout_s: float = 600.0
    """Ranks join the job once each has loaded its stage; one that waits longer for the others gives up (a compile
    warm-up takes minutes on a CPU; torchrun's rendezvous waits 600 s too)."""

    step_timeout_s: float = 600.0
    """One stage step (a prefill, a decode chunk) longer than this is declared a hang; raise it for huge prompts."""

    control_addr: str = ""
    """Address rank 0 binds the control plane to; empty: loopback on one host, else its address towards MASTER_ADDR."""

    def __post_init__(self) -> None:
        _check_types(self)
        if not (math.isfinite(self.step_timeout_s) and self.step_timeout_s > 0):
            raise _invalid(
                "transport.step_timeout_s", self.step_timeout_s, "a finite number of seconds > 0",
                "set e.g. `--transport.step_timeout_s=600`",
            )
        if not (math.isfinite(self.join_timeout_s) and self.join_timeout_s > 0):
            raise _invalid(
                "transport.join_timeout_s", self.join_timeout_s, "a finite number of seconds > 0",
                "set e.g. `--transport.join_timeout_s=600`",
            )
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise _invalid(
                "transport.timeout_s", self.timeout_s, "a finite number of seconds > 0",
                "set e.g. `--transport.timeout_s=60` (use a large value such as 3600 when debugging)",
            )


@dataclass
class LoggingConfig:
    """Log output."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"
    """Log level of the `adadecode` loggers."""

    def __post_init__(self) -> None:
        _check_types(self)


@dataclass
class ServeConfig:
    """`adadecode serve`: the OpenAI-compatible HTTP server on rank 0 (launcher/serve/)."""

    host: str = "127.0.0.1"
    """Address the HTTP server listens on; 127.0.0.1 keeps it on this machine, 0.0.0.0 opens it to the network."""

    port: int = 8000
    """TCP port of the HTTP server; 0 picks a free one (printed at start-up)."""

    max_num_seqs: int = 8
    """Sequences decoded at once: KV cache slots on every stage, checked against free memory at start-up."""

    max_queue: int = 64
    """Requests waiting for a slot beyond max_num_seqs; past it a request gets HTTP 429."""

    served_model_name: str = ""
    """Model name clients send and /v1/models lists; empty: the bundled name, or the model directory's or
    file's name (never its path)."""

    api_key: str = ""
    """Key every request but GET /health must send as `Authorization: Bearer <key>`; empty:
    $ADADECODE_API_KEY, else none (the variable keeps it out of `ps`)."""

    metrics_public: bool = False
    """With an API key: GET /metrics answers without it too."""

    max_connections: int = 512
    """Open connections (or running requests) at most; past it new ones get HTTP 503."""

    read_timeout_s: float = 30.0
    """A connection must send a whole request (head and body) within this many seconds, or it is closed."""

    send_timeout_s: float = 60.0
    """A client that reads nothing of its response for this many seconds is dropped and its request cancelled."""

    early_exit_below: int = 0
    """Requests' early exit applies only while fewer sequences than this run (a full pipeline idles no
    more); 0: the stage count, at least 2."""

    batching: BatchingMode = "auto"
    """Sequences at one layer range run as one call. exact: each through each layer alone; fused: the layers once
    over all rows (each row's bits as alone unless pipeline.row_invariant is off; docs/serving.md); auto: fused
    where a stage's compiled step runs the rows in one call with each row's bits (compiled, on the CPU), else exact."""

    def __post_init__(self) -> None:
        _check_types(self)
        if self.host.strip() == "":
            raise _invalid(
                "serve.host", self.host, "an address to listen on",
                "use `--serve.host=127.0.0.1` (this machine only) or `--serve.host=0.0.0.0` (every interface)",
            )
        if not 0 <= self.port <= 65535:
            raise _invalid(
                "serve.port", self.port, "a TCP port in 0..65535 (0: any free port)",
                "set e.g. `--serve.port=8000`",
            )
        if self.max_num_seqs < 1:
            raise _invalid(
                "serve.max_num_seqs", self.max_num_seqs, "an integer >= 1 (cache slots per stage)",
                "set e.g. `--serve.max_num_seqs=8`",
            )
        if self.early_exit_below < 0:
            raise _invalid(
                "serve.early_exit_below", self.early_exit_below, "an integer >= 0 (0: the stage count, at least 2)",
                "set e.g. `--serve.early_exit_below=0`, or above serve.max_num_seqs to never switch heads off",
            )
        if self.max_queue < 1:
            raise _invalid(
                "serve.max_queue", self.max_queue, "an integer >= 1 (requests waiting for a slot)",
                "set e.g. `--serve.max_queue=64`",
            )
        if self.max_connections < 1:
            raise _invalid(
                "serve.max_connections", self.max_connections, "an integer >= 1 (open connections)",
                "set e.g. `--serve.max_connections=512`",
            )
        for key in ("read_timeout_s", "send_timeout_s"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise _invalid(f"serve.{key}", value, "a finite number of seconds > 0", f"set e.g. `--serve.{key}=30`")


@dataclass
class RunConfig:
    """The whole run; hand each component only its own section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model source, dtype and KV cache size."""

    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    """Stage count and layer split."""

    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    """Generation length, early exit and stop conditions."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Greedy decoding, or sampling with a stated guarantee (seeded or speculative)."""

    transport: TransportConfig = field(default_factory=TransportConfig)
    """Communication backend between stages."""

    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""

    serve: ServeConfig = field(default_factory=ServeConfig)
    """The HTTP server of `adadecode serve`; decoding.max_new_tokens / early_exit / stop are each request's defaults."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, f.type):
                raise _invalid(
                    f.name, value, f"a {f.type.__name__}",
                    f"build it with `{f.type.__name__}(...)` or use load_config()",
                )
        # The prompt needs at least one cache position besides the generated tokens.
        if self.decoding.max_new_tokens >= self.model.max_seq_len:
            raise _invalid(
                "decoding.max_new_tokens", self.decoding.max_new_tokens,
                f"fewer than model.max_seq_len = {self.model.max_seq_len} positions, leaving room for the prompt",
                f"lower decoding.max_new_tokens or raise `--model.max_seq_len` above {self.decoding.max_new_tokens}",
            )


def check_world_size(pipeline: PipelineConfig, transport: TransportConfig, world_size: int) -> None:
    """Raise ConfigError unless `world_size` ranks fit the stage count and backend."""
    if transport.backend == "auto" and world_size == 1:
        return  # one process: in-process stages, or ranks it spawns itself
    if transport.backend == "inprocess":
        if world_size != 1:
            raise _invalid(
                "transport.backend", transport.backend,
                f"a single process (all stages in one), but WORLD_SIZE={world_size}",
                f"run without torchrun, or use `--transport.backend=gloo` with `--pipeline.stages={world_size}`",
            )
    elif world_size != pipeline.stages:
        raise _invalid(
            "pipeline.stages", pipeline.stages,
            f"one rank per stage with backend {transport.backend!r}, but WORLD_SIZE={world_size}",
            f"launch {pipeline.stages} ranks (torchrun --nproc-per-node={pipeline.stages}) "
            f"or set `--pipeline.stages={world_size}`",
        )


# The section name of each section class, read off RunConfig so it is stated once.
_SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(RunConfig)}
_SECTION_OF: dict[type, str] = {cls: name for name, cls in _SECTIONS.items()}


# ----------------------------------------------------------------- type checking


def _invalid(key: str, value: Any, expected: str, fix: str) -> ConfigError:
    return ConfigError(f"invalid {key} = {value!r}: expected {expected}; {fix}", key=key)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return {int: "a list of ints", float: "a list of numbers", str: "a list of strings"}[typing.get_args(tp)[0]]
    return {bool: "a bool (true/false)", int: "an int", float: "a float", str: "a string"}[tp]


def _example(key: str, tp: Any) -> str:
    """A CLI flag that would set `key` to a valid value of type `tp`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        value = typing.get_args(tp)[0]
    elif origin is list:
        value = {int: "10,20", float: "0.9,0.8", str: "a,b"}[typing.get_args(tp)[0]]
    else:
        value = {bool: "true", int: "2", float: "1.5", str: "text"}[tp]
    return f"`--{key}={value}`"


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check `value` against `tp`, converting only where no information is lost."""
    origin = typing.get_origin(tp)
    yaml_hint = {bool: "unquoted true/false", int: "an unquoted number", float: "an unquoted number"}
    fix = f"write it like {_example(key, tp)}"
    if tp in yaml_hint:
        fix += f" (in YAML, {yaml_hint[tp]})"
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, str) and value in choices:
            return value
        # YAML 1.1 reads an unquoted `off` as false; map it back rather than fail on valid-looking YAML.
        if value is False and "off" in choices:
            return "off"
        close = difflib.get_close_matches(str(value), choices, n=1)
        close += [c for c in choices if c.lower() == str(value).lower()]
        hint = f"did you mean {close[-1]!r}?" if close else f"pick one of them, e.g. {_example(key, tp)}"
        raise _invalid(key, value, _type_name(tp), hint)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _invalid(key, value, _type_name(tp), f"write a list, e.g. {_example(key, tp)} or a YAML list")
        (item_tp,) = typing.get_args(tp)
        items = []
        for item in value:
            try:
                items.append(_coerce(key, item_tp, item))
            except ConfigError:
                raise _invalid(
                    key, value, _type_name(tp), f"item {item!r} is not {_type_name(item_tp)}; {fix}"
                ) from None
        return items  # a fresh list, so configs never share a mutable default
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a schema field of a type this loader cannot parse
        raise TypeError(f"unsupported config field type {tp!r} for {key}")
    raise _invalid(key, value, _type_name(tp), fix)


def _check_types(section: Any) -> None:
    name = _SECTION_OF[type(section)]
    for f in dataclasses.fields(section):
        setattr(section, f.name, _coerce(f"{name}.{f.name}", f.type, getattr(section, f.name)))


# ------------------------------------------------------------------ docstrings


def field_docs() -> dict[str, str]:
    """`{"section.key": docstring}` for every field, plus `{"section": docstring}` per section.

    Read with `ast` from this module's source: the string literal right under a
    field is otherwise discarded by Python.
    """
    try:
        source = inspect.getsource(sys.modules[__name__])
    except (OSError, TypeError):  # frozen or source-less install: help loses its text, nothing else
        return {}
    classes = {cls.__name__: name for name, cls in _SECTIONS.items()}
    docs: dict[str, str] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        if node.name == RunConfig.__name__:
            prefix = ""  # RunConfig's fields are the sections
        elif node.name in classes:
            prefix = classes[node.name] + "."
        else:
            continue
        for stmt, nxt in zip(node.body, node.body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[prefix + stmt.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs
