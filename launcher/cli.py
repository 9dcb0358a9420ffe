"""The `adadecode` command.

Generate with the bundled SmolLM2-135M-Instruct on the default config
(configs/smollm2-135m.yaml), streaming the answer to stdout:

    adadecode generate --prompt "What is the capital of France?" --chat

Several prompts, one JSON object per prompt on stdout:

    adadecode generate --prompts data/prompts/heldout.jsonl --json --max-new-tokens 64

Another model (a Hugging Face directory or a .gguf file), three pipeline
stages simulated in one process, any config key overridden from the CLI:

    adadecode generate --model ~/models/Qwen2.5-0.5B-Instruct --stages 3 --prompt "..." \\
        --model.max_seq_len=4096 --pipeline.threads=2

One rank per stage (docs/distributed.md): `--stages N` alone spawns N local gloo
ranks and supervises them; under torchrun, Slurm's srun or the DeepSpeed
launcher each process is one rank (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR
from launcher/dist_env.py), rank 0 prints:

    adadecode generate --stages 2 --prompt "..."                          # 2 local ranks, 1 thread each, pinned
    torchrun --nproc-per-node 2 --no-python adadecode generate --stages 2 --prompt "..."
    torchrun --nnodes 2 --nproc-per-node 1 --node-rank $NODE --rdzv-backend c10d \
        --rdzv-endpoint $HEAD:29500 --no-python adadecode generate --stages 2 --prompt "..."
    sbatch --nodes 2 scripts/slurm/adadecode.sbatch --prompt "..."
    deepspeed --num_gpus 2 --module adadecode.launcher.cli generate --stages 2 --prompt "..."
    adadecode generate --stages 3 --dry-run                               # the plan, nothing loaded

Sampling, seeded (the same tokens with or without early exit, at any stage count) or
speculative (heads' draws kept with probability min(1, p/q)):

    adadecode generate --prompt "..." --temperature 0.8 --top-p 0.95 --seed 1 --early-exit deferred
    adadecode generate --prompt "..." --temperature 0.8 --sampling speculative --early-exit eager

A timeline of every stage and the coordinator (docs/generating.md, Traces): DIR/trace.json opens in
Perfetto (https://ui.perfetto.dev), DIR/trace.png is a Gantt chart; works on every launch path:

    adadecode generate --prompt "..." --early-exit deferred --stages 2 --trace traces/run1

Speed against transformers' `generate`, same process, same threads:

    adadecode bench --prompts data/prompts/heldout.jsonl --num-prompts 8 --pipeline.threads=2

This runtime's schedule on simulated time (launcher/simulate.py; docs/simulator.md): fitted
on a bench trace, or projected to GPUs:

    adadecode simulate --trace traces/bench/trace.json
    adadecode simulate --profile llama-3.1-70b --link ib --stages 8 --early-exit deferred

An OpenAI-compatible server (launcher/serve/; docs/serving.md): in process, on N
spawned local ranks, or under torchrun / Slurm (rank 0 serves, the others run their stages):

    adadecode serve --port 8000                                           # one process
    adadecode serve --stages 2 --port 8000 --serve.max_num_seqs=8         # 2 local ranks
    ADADECODE_API_KEY=... torchrun --nproc-per-node 2 --no-python adadecode serve --stages 2 --host 0.0.0.0
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
        -d '{"prompt": "The capital of France is", "max_tokens": 16}'

Exit heads for a model (self-distillation; see launcher/train_heads.py):

    adadecode train-heads --model ~/models/Qwen2.5-0.5B-Instruct --out heads/qwen --threads 2

A draft table for a model (its own greedy answers; see launcher/draft_table.py):

    adadecode build-draft-table --model ~/models/Qwen2.5-0.5B-Instruct --out tables/qwen.safetensors

Every config key is a flag `--section.key=value` (see `adadecode generate --help`);
precedence is CLI > `--config FILE` > the model's generation_config.json (its EOS ids, and
sampling where it sets do_sample; `--generation-config none` ignores it) > defaults.

Exit status (launcher/errors.py): 0 done; 2 a user error, one line `adadecode: error: ...`
(bad config or input, a request that does not fit the cache, a rank that died, hung or
failed — named, with its cause); 3 an internal error (a bug: a protocol violation, a torch
error), printed with its traceback; 130 interrupted. With `--stages N` each rank reports its
own error, and the job exits with status 3 if any rank had an internal error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING

from .config import (
    RunConfig,
    config_help,
    dump_yaml,
    load_config,
    sampling_params,
)
from .errors import EXIT_INTERRUPTED, report_error

if TYPE_CHECKING:
    from adadecode.runtime.engine import Engine

# Short flags for the keys users change most; each maps onto a config key.
SHORTCUTS = {
    "model": "model.source",
    "revision": "model.revision",
    "max_new_tokens": "decoding.max_new_tokens",
    "stages": "pipeline.stages",
    "early_exit": "decoding.early_exit",
    "temperature": "sampling.temperature",
    "top_p": "sampling.top_p",
    "top_k": "sampling.top_k",
    "min_p": "sampling.min_p",
    "seed": "sampling.seed",
    "sampling": "sampling.mode",
    "generation_config": "model.generation_config",
}


TRACE_HELP = "record every stage's and the coordinator's events: DIR/trace.json (Perfetto) and DIR/trace.png"


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config (default: configs/smollm2-135m.yaml's values)")
    p.add_argument("--model", metavar="SOURCE",
                   help="Hugging Face directory, .gguf file or Hub id org/name (model.source)")
    p.add_argument("--revision", metavar="REV", help="a Hub id's branch, tag or commit (model.revision)")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="decoding.max_new_tokens")
    p.add_argument("--stages", type=int, metavar="N", help="pipeline stages, split automatically")
    p.add_argument("--early-exit", choices=["off", "eager", "deferred"], help="decoding.early_exit")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template (decoding.chat)")
    # Sampling: values are checked by the config (launcher/config/, through runtime/params.py), so a bad one
    # is a one-line error.
    p.add_argument("--temperature", metavar="T", help="sampling.temperature (0: greedy)")
    p.add_argument("--top-p", metavar="P", help="sampling.top_p, in (0, 1]")
    p.add_argument("--top-k", metavar="K", help="sampling.top_k (0: off)")
    p.add_argument("--min-p", metavar="P", help="sampling.min_p, in [0, 1]")
    p.add_argument("--seed", metavar="N", help="sampling.seed")
    p.add_argument("--sampling", metavar="{seeded,speculative}", help="sampling.mode")
    p.add_argument("--generation-config", metavar="{auto,none,DIR}",
                   help="the model's generation_config.json as defaults (model.generation_config)")
    p.add_argument("--print-config", action="store_true", help="print the effective config as YAML and exit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adadecode",
        description="Pipeline-parallel LLM decoding with verified early exit.",
        epilog="Config keys (--section.key=value):\n" + config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser(
        "generate",
        help="generate text (greedy, or sampled with --temperature)",
        epilog="Config keys (--section.key=value):\n" + config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = gen.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", metavar="FILE", help='JSONL, one {"prompt": ...} or {"messages": [...]} per line')
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt on stdout instead of text")
    gen.add_argument("--stop", action="append", metavar="STR", help="stop string (repeatable; decoding.stop)")
    gen.add_argument("--dry-run", action="store_true",
                     help="print the launch plan and stage split as JSON, load nothing")
    gen.add_argument("--trace", metavar="DIR", help=TRACE_HELP)
    _add_config_flags(gen)

    srv = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (completions, chat, streaming, /metrics)",
        epilog="Config keys (--section.key=value):\n" + config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    srv.add_argument("--host", metavar="ADDR", help="address to listen on (serve.host; default 127.0.0.1)")
    srv.add_argument("--port", type=int, metavar="N", help="TCP port, 0 for any free one (serve.port; default 8000)")
    srv.add_argument("--api-key", metavar="KEY",
                     help="key every request but /health must send as `Authorization: Bearer KEY` (serve.api_key; "
                          "prefer the variable ADADECODE_API_KEY: a flag shows in `ps`)")
    srv.add_argument("--metrics-public", action="store_const", const=True,
                     help="with a key: GET /metrics answers without it (serve.metrics_public)")
    srv.add_argument("--served-model-name", metavar="NAME",
                     help="model name clients send and /v1/models lists (serve.served_model_name)")
    srv.add_argument("--dry-run", action="store_true",
                     help="print the launch plan and stage split as JSON, load nothing")
    srv.add_argument("--config", metavar="FILE", help="YAML config (default: configs/smollm2-135m.yaml's values)")
    srv.add_argument("--model", metavar="SOURCE",
                     help="Hugging Face directory, .gguf file or Hub id org/name (model.source)")
    srv.add_argument("--revision", metavar="REV", help="a Hub id's branch, tag or commit (model.revision)")
    srv.add_argument("--max-new-tokens", type=int, metavar="N", help="max_tokens of a request that sends none")
    srv.add_argument("--stages", type=int, metavar="N", help="pipeline stages, split automatically")
    srv.add_argument("--early-exit", choices=["off", "eager", "deferred"], help="a request's default early exit")
    srv.add_argument("--generation-config", metavar="{auto,none,DIR}",
                     help="the model's generation_config.json as each request's defaults (model.generation_config)")
    srv.add_argument("--print-config", action="store_true", help="print the effective config as YAML and exit")
    srv.set_defaults(chat=False, **dict.fromkeys(SHORTCUTS))  # generate's flags, absent here

    # Parsed by launcher/train_heads.py (main() hands it the arguments); listed here for --help.
    sub.add_parser("train-heads", add_help=False, help="train exit heads for a model (train-heads --help)")
    sub.add_parser("build-draft-table", add_help=False,
                   help="the model's own answers as a table of drafts (build-draft-table --help)")
    # Parsed by launcher/simulate.py, likewise.
    sub.add_parser("simulate", add_help=False,
                   help="simulate this runtime's schedule: fit a trace, project to other hardware (simulate --help)")

    bench = sub.add_parser("bench", help="tokens/s against transformers generate, same process and threads")
    bench.add_argument("--prompts", metavar="FILE", default="data/prompts/heldout.jsonl")
    bench.add_argument("--num-prompts", type=int, default=8, metavar="N")
    bench.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed generations first")
    bench.add_argument("--modes", default="off", metavar="M,M", help="early-exit modes to time: off,eager,deferred")
    bench.add_argument("--sampling-modes", default="", metavar="M,M",
                       help="with --temperature: sampling modes to time each early-exit mode under "
                            "(seeded,speculative; default: sampling.mode)")
    bench.add_argument("--hf-early-exit", default="", metavar="K,K",
                       help="also time transformers generate(assistant_early_exit=K) for each K")
    bench.add_argument("--json", action="store_true", help="print the summary as JSON")
    bench.add_argument("--trace", metavar="DIR", help=TRACE_HELP + " (the timed runs)")
    _add_config_flags(bench)
    return parser


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, RunConfig]:
    """Split argv into our own flags and config overrides; return both, validated."""
    args, rest = build_parser().parse_known_args(list(argv))
    overrides = list(rest)
    for name, key in SHORTCUTS.items():
        value = getattr(args, name)
        if value is not None:
            overrides.append(f"--{key}={value}")
    for name in ("host", "port", "api_key", "metrics_public", "served_model_name"):  # `serve` only
        if getattr(args, name, None) is not None:
            overrides.append(f"--serve.{name}={getattr(args, name)}")
    if args.stages is not None:
        overrides.append("--pipeline.split_points=[]")  # an explicit split belongs to its own stage count
    if args.chat:
        overrides.append("--decoding.chat=true")
    if getattr(args, "stop", None):
        overrides.append("--decoding.stop=" + json.dumps(args.stop))
    if args.config:
        overrides = ["--config", args.config, *overrides]
    from .launch import generation_config_defaults

    return args, load_config(overrides, model_defaults=generation_config_defaults)


def setup_process(cfg: RunConfig) -> None:
    """Process-wide knobs: log level and torch threads."""
    import torch

    logging.basicConfig(level=cfg.logging.level, format="%(levelname)s %(name)s: %(message)s")
    if cfg.pipeline.threads > 0:
        torch.set_num_threads(cfg.pipeline.threads)


def cmd_generate(args: argparse.Namespace, cfg: RunConfig, argv: Sequence[str] = ()) -> int:
    """`adadecode generate`: every prompt through the pipeline, on whichever process gets the engine."""
    from adadecode.runtime.prompts import read_prompts

    from .launch import launch

    prompts = None
    if not args.dry_run:
        if args.prompt is None and args.prompts is None:
            raise ValueError("give a prompt: --prompt TEXT, or --prompts FILE (JSONL)")
        prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
    return launch(cfg, argv, nullcontext(lambda engine: generate_all(args, cfg, engine, prompts)),
                  trace=bool(args.trace), dry_run=args.dry_run)


def compile_long_runs(cfg: RunConfig) -> None:
    """``pipeline.compile: auto`` for `serve` and `bench`: on, on every device. On CUDA `auto`
    compiles anyway; on the CPU the compiled step decodes 1.6-1.8x faster and costs minutes at
    load (compiled again in every process: inductor cannot cache its graphs), which a server and
    a benchmark of the fastest plain path repay, and one `generate` call does not."""
    if cfg.pipeline.compile == "auto":
        cfg.pipeline.compile = "on"


def cmd_bench(args: argparse.Namespace, cfg: RunConfig, argv: Sequence[str] = ()) -> int:
    """`adadecode bench`: on the stages in this process, or on N ranks like `generate` (rank 0 measures)."""
    from .bench import plan_bench, run_bench
    from .launch import launch

    compile_long_runs(cfg)
    timed = [m for m in args.modes.split(",") if m in ("eager", "deferred")]  # bench refuses the others
    if cfg.decoding.early_exit == "off" and timed:  # heads are chosen for a policy: the first one timed
        cfg.decoding.early_exit = timed[0]
    bench = plan_bench(args, cfg)  # a bad flag or prompt file fails before anything loads
    return launch(cfg, argv, nullcontext(lambda engine: run_bench(args, cfg, bench, engine)), trace=bool(args.trace))


def cmd_serve(args: argparse.Namespace, cfg: RunConfig, argv: Sequence[str] = ()) -> int:
    """`adadecode serve`: rank 0 (or the one process) serves HTTP; other ranks run their stages."""
    from .launch import launch
    from .serve.command import check_cache_memory, serving

    compile_long_runs(cfg)
    return launch(cfg, argv, serving(cfg), serving=True, dry_run=args.dry_run, check=check_cache_memory)


def generate_all(args: argparse.Namespace, cfg: RunConfig, engine: Engine, prompts) -> int:
    """Generate every prompt with ``engine`` and print each result (text or JSON), then the
    run's summary on stderr (and, with ``--trace``, write the trace)."""
    from adadecode.runtime.run_stats import RunTotals, summary_lines

    d = cfg.decoding
    totals = RunTotals()
    for prompt in prompts:
        stream = None if args.json else _stdout_writer
        result = engine.generate(
            prompt,
            max_new_tokens=d.max_new_tokens,
            chat=d.chat,
            stop=d.stop,
            early_exit=d.early_exit,
            on_text=stream,
            sampling=sampling_params(cfg.sampling),
        )
        totals.add(len(result.tokens), result.counters)
        if args.json:
            record = {"prompt": prompt, **result.as_dict()}
            print(json.dumps(record, ensure_ascii=False), flush=True)
        else:
            sys.stdout.write("\n")
            sys.stdout.flush()
            compiled = result.stats.get("compile_s", 0.0)  # only in the calls that compiled: reported once
            note = f", {compiled:.0f} s of it compiling" if compiled >= 0.5 else ""
            print(
                f"[{len(result.tokens)} tokens, {result.tokens_per_s:.1f} tokens/s, {result.finish_reason}{note}]",
                file=sys.stderr,
            )
    summary = totals.summary()
    lines = summary_lines(summary, engine.layer_ranges)
    if len(prompts) == 1 and not args.json:
        lines = lines[1:]  # its tokens/s were just printed
    for line in lines:
        print(f"[{line}]", file=sys.stderr)
    if args.trace:
        from .trace_export import save_trace

        save_trace(args.trace, engine, summary)
    return 0


def _stdout_writer(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The DeepSpeed launcher (and torch.distributed.launch) put `--local_rank=N` first; the
    # same value is in LOCAL_RANK, which launcher/dist_env.py reads.
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    if argv[:1] == ["train-heads"]:  # its own flags, not the run config
        from .train_heads import main as train_heads

        return train_heads(argv[1:])
    if argv[:1] == ["build-draft-table"]:  # likewise
        from .draft_table import main as build_draft_table

        return build_draft_table(argv[1:])
    if argv[:1] == ["simulate"]:  # its own flags, no model to load
        from .simulate import main as simulate

        return simulate(argv[1:])
    try:
        args, cfg = parse(argv)
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return 0
        setup_process(cfg)
        if args.command == "generate":
            return cmd_generate(args, cfg, argv)
        if args.command == "serve":
            return cmd_serve(args, cfg, argv)
        return cmd_bench(args, cfg, argv)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - user errors in one line, bugs with a traceback (launcher/errors.py)
        return report_error(e)


if __name__ == "__main__":
    sys.exit(main())
