"""One launch path for `generate`, `bench` and `serve`: a config in, a running engine handed to the command.

``launch`` plans how this process runs the pipeline (``distributed.plan_launch``: in process,
spawn N local ranks, or be one rank under torchrun / Slurm / a spawned job), checks the devices
and, where it is needed, the model, once and before anything loads or spawns; then

- ``inprocess``: loads every stage here (``Engine.load``);
- ``spawn``: re-runs this command line as N local ranks and supervises them; loads nothing;
- ``rank``: loads this rank's stage (``distributed.run_rank``); rank 0 gets a
  ``PipelineEngine``, every other rank serves its stage until rank 0 shuts the pipeline down.

The command sees only the engine: what it runs with it is the ``session`` it passes in.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from .config import RunConfig, load_spec
from .dist_env import read_dist_env
from .distributed import LaunchPlan, check_devices, describe_plan, plan_launch, run_rank, spawn_local

if TYPE_CHECKING:
    from adadecode.runtime.engine import Engine

log = logging.getLogger("adadecode.launch")

EngineUse = Callable[["Engine"], int]  # what a command does with the engine; its status is the command's
ModelCheck = Callable[[RunConfig, LaunchPlan, object, list[tuple[int, int]]], None]  # (cfg, plan, HF config, ranges)


def launch(
    cfg: RunConfig,
    argv: Sequence[str],
    session: AbstractContextManager[EngineUse],
    *,
    serving: bool = False,
    trace: bool = False,
    dry_run: bool = False,
    check: ModelCheck | None = None,
) -> int:
    """Run ``cfg``'s pipeline the way this process was started; the exit status of the command.

    ``session`` is entered only on the process that gets the engine (rank 0, or this one), before
    the model loads, and yields what to run with it: `serve` listens there, so that ``/health``
    answers 503 while the model loads; `generate` and `bench` pass ``nullcontext(fn)``.
    ``argv``: this command line, which ``spawn`` re-runs on every rank.
    ``serving`` (`serve`): every stage gets ``serve.max_num_seqs`` cache slots, and ranks other
    than 0 leave a SIGTERM to rank 0, which ends serving in order.
    ``trace`` (``--trace``): record events on every rank alike; the engine's runner ends up with all.
    ``dry_run``: print the plan and the stage split as JSON; load nothing.
    ``check(cfg, plan, config, ranges)``: start-up checks of the model, before anything loads or spawns.
    """
    plan = plan_launch(cfg, read_dist_env())
    if dry_run:
        return print_plan(cfg, plan)
    check_devices(cfg, plan)  # once, here, not in N processes
    if check is not None or plan.mode == "spawn":
        config, ranges = stage_split(cfg)  # a bad model or split fails here, once, not in N processes
        if check is not None:
            check(cfg, plan, config, ranges)
    if plan.mode == "spawn":
        return spawn_local(argv, cfg, plan)
    if plan.mode == "rank" and plan.env.rank != 0:
        if serving:
            defer_sigterm_to_rank0(plan.env.rank)
        return run_rank(cfg, plan, None, serving=serving, trace=trace)  # serves its stage until rank 0 stops
    with session as use_engine:
        if plan.mode == "rank":
            return run_rank(cfg, plan, use_engine, serving=serving, trace=trace)
        from adadecode.runtime.engine import Engine

        engine = Engine.load(load_spec(cfg, serving=serving))
        if trace:
            engine.runner.set_trace(True)
        return use_engine(engine)


def stage_split(cfg: RunConfig) -> tuple[object, list[tuple[int, int]]]:
    """The model's HF config and the layer range of each stage; resolves (and, for a GGUF,
    converts once) the model, loads no weights."""
    from adadecode.runtime.hf_adapter import load_hf_config
    from adadecode.runtime.loading import plan_stages
    from adadecode.runtime.model_source import resolve_model

    m, p = cfg.model, cfg.pipeline
    config = load_hf_config(resolve_model(m.source, m.cache_dir or None, m.revision or None).path)
    return config, plan_stages(config, p.stages, p.split_points)


def generation_config_defaults(cfg: RunConfig) -> tuple[str, dict[str, dict[str, Any]]]:
    """The model's generation_config.json as config values (``load_config``'s ``model_defaults``):
    its sampling defaults, where it sets ``do_sample`` (runtime/generation_config.py), for the
    keys that neither the YAML nor the command line set; its EOS ids the engine reads itself.
    ``model.generation_config``: auto (the model's own), none, or a directory holding one.

    A model that cannot be resolved contributes nothing here: loading it reports why."""
    from adadecode.runtime.generation_config import generation_config_path, read_generation_config
    from adadecode.runtime.model_source import ModelSourceError, resolve_model

    m = cfg.model
    if m.generation_config == "none":
        return "", {}
    model_dir = ""
    if m.generation_config == "auto":
        try:
            model_dir = str(resolve_model(m.source, m.cache_dir or None, m.revision or None).path)
        except ModelSourceError:
            return "", {}
    defaults = read_generation_config(model_dir, m.generation_config)
    where = f"the model's {generation_config_path(model_dir, m.generation_config)}"
    if defaults.ignored:
        log.warning("%s sets %s, which adadecode does not implement; ignored", where, ", ".join(defaults.ignored))
    if not defaults.sampling:
        return where, {}
    shown = ", ".join(f"{k}={v}" for k, v in defaults.sampling.items())
    log.warning("sampling defaults from %s (do_sample: true): %s, for the keys not set; --temperature 0 or "
                "--generation-config none decodes greedily", where, shown)
    return where, {"sampling": dict(defaults.sampling)}


def print_plan(cfg: RunConfig, plan: LaunchPlan) -> int:
    """``--dry-run``: the launch plan and the stage split (no weights are loaded) as JSON."""
    _, ranges = stage_split(cfg)
    print(json.dumps(describe_plan(plan, cfg, ranges)))
    return 0


def defer_sigterm_to_rank0(rank: int) -> None:
    """A serving rank other than 0 outlives a SIGTERM: the launcher (torchrun, `--stages N`,
    Slurm's scancel) sends it to every rank at once, and rank 0, which got it too, ends
    serving in order and then stops this rank. Were this rank to die first, rank 0 would see
    a lost rank and fail the requests in flight. Rank 0 gone for good is found by the control
    plane's timeout, as always. For the rest of the process: it ends with serving."""
    def note(*_):
        print(f"adadecode: rank {rank}: SIGTERM: serving ends when rank 0 ends it", file=sys.stderr, flush=True)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, note)
