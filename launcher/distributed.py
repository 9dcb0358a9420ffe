"""Multi-rank runs: which way to start, and one rank's life.

``plan_launch`` picks the mode from ``transport.backend`` and the launcher
environment (``launcher/dist_env.py``):

- under torchrun / Slurm / the DeepSpeed launcher: this process is one rank
  (``auto`` means gloo there; ``--transport.backend=nccl`` for GPUs);
- otherwise, ``inprocess``, or ``auto`` with one stage: every stage in this process;
- otherwise (``auto``/``gloo``/``nccl`` with N > 1 stages): spawn N local ranks
  of this same command line (``launcher/spawn.py``) and supervise them;
- ``gloo``/``nccl`` with one stage: a one-rank job in this process.

``launcher/launch.py`` acts on the plan, for every command. ``run_rank`` is one rank:
pin its threads, load only its own stage (``adadecode.runtime.loading.load_rank``),
join the transport, then rank 0 hands its ``PipelineEngine`` to the command (which
generates, benchmarks or serves), while every other rank serves its stage until
rank 0 shuts the pipeline down.

Threads and pinning: a rank uses ``pipeline.threads`` torch threads (1 when
0). With ``pipeline.pin_cpus`` (default), local rank i is pinned with
``os.sched_setaffinity`` to cores ``[i*threads, (i+1)*threads)`` of the cores
this process may use, before torch starts its thread pool — when there are
that many; otherwise (e.g. Slurm already gave each task its own cores) the
placement is left alone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .config import RunConfig, check_world_size, load_spec
from .dist_env import DistEnv
from .errors import EXIT_INTERNAL_ERROR, report_error

log = logging.getLogger("adadecode.launch")


@dataclass(frozen=True)
class LaunchPlan:
    mode: str  # "inprocess", "spawn" or "rank"
    backend: str  # "inprocess", "gloo" or "nccl"
    world_size: int
    env: DistEnv


def plan_launch(cfg: RunConfig, env: DistEnv) -> LaunchPlan:
    """How to run ``cfg`` given this process's launcher environment (raises ConfigError on a mismatch)."""
    backend, stages = cfg.transport.backend, cfg.pipeline.stages
    if env.under_launcher:
        backend = "gloo" if backend == "auto" else backend
        check_world_size(cfg.pipeline, dataclasses.replace(cfg.transport, backend=backend), env.world_size)
        if backend == "inprocess":
            return LaunchPlan("inprocess", backend, 1, env)
        return LaunchPlan("rank", backend, env.world_size, env)
    if backend == "inprocess" or (backend == "auto" and stages == 1):
        return LaunchPlan("inprocess", "inprocess", 1, env)
    backend = "gloo" if backend == "auto" else backend
    if stages == 1:
        return LaunchPlan("rank", backend, 1, env)
    return LaunchPlan("spawn", backend, stages, env)


def check_devices(cfg: RunConfig, plan: LaunchPlan) -> list[str]:
    """Each local rank's device and dtype (``cuda:0 bfloat16``), checked before anything loads or
    spawns: an impossible device / dtype / backend combination raises ``PlacementError``."""
    from adadecode.runtime.device import check_placement, dtype_name

    m, env = cfg.model, plan.env
    if plan.mode == "spawn":
        local_ranks, local_world = range(plan.world_size), plan.world_size
    elif plan.mode == "rank":
        local_ranks, local_world = [env.local_rank], env.local_world_size or env.local_rank + 1
    else:
        local_ranks, local_world = [0], 1
    placed = []
    for lr in local_ranks:
        device, dtype = check_placement(
            m.device, m.dtype, plan.backend, local_rank=lr, local_world_size=local_world
        )
        placed.append(f"{device} {dtype_name(dtype)}")
    return placed


def describe_plan(plan: LaunchPlan, cfg: RunConfig, ranges: Sequence[tuple[int, int]]) -> dict:
    """What a run would do, for ``--dry-run``."""
    threads = cfg.pipeline.threads or (1 if plan.world_size > 1 or plan.mode != "inprocess" else 0)
    return {
        "mode": plan.mode,
        "backend": plan.backend,
        "launcher": plan.env.launcher,
        "world_size": plan.world_size,
        "stages": [list(r) for r in ranges],
        "devices": check_devices(cfg, plan),  # this node's ranks
        "threads_per_rank": threads or "torch default",
        "pin_cpus": cfg.pipeline.pin_cpus and plan.world_size > 1,
        "master": f"{plan.env.master_addr}:{plan.env.master_port}" if plan.mode == "rank" else None,
        "timeout_s": cfg.transport.timeout_s,
    }


def pin_cpus(local_rank: int, threads: int) -> list[int] | None:
    """Pin this process to its own ``threads`` cores; None when it cannot (too few cores, no API)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    lo = local_rank * threads
    if lo + threads > len(allowed):
        return None
    cores = allowed[lo : lo + threads]
    os.sched_setaffinity(0, cores)
    return cores


def spawn_local(argv: Sequence[str], cfg: RunConfig, plan: LaunchPlan) -> int:
    """Run this command line as ``plan.world_size`` local ranks; the exit code of the job."""
    from .spawn import spawn_ranks

    command = [sys.executable, "-m", "adadecode.launcher.cli", *argv, f"--transport.backend={plan.backend}"]

    def report(ex) -> None:
        if ex.returncode != 0:
            print(f"adadecode: {ex.describe()}", file=sys.stderr, flush=True)

    # Ranks notice a failed peer within transport.timeout_s; after that the rest are stopped.
    exits = spawn_ranks(command, plan.world_size, grace_s=cfg.transport.timeout_s + 10, on_exit=report)
    failed = [ex for ex in exits if ex.returncode != 0]
    if not failed:
        return 0
    if any(ex.returncode == EXIT_INTERNAL_ERROR for ex in failed):  # a bug anywhere is the job's cause
        return EXIT_INTERNAL_ERROR
    return failed[0].returncode if failed[0].returncode > 0 else 1


def run_rank(
    cfg: RunConfig, plan: LaunchPlan, use_engine: Callable[[object], int] | None, *, serving: bool = False,
    trace: bool = False,
) -> int:
    """This process as one rank; rank 0 hands its ``PipelineEngine`` to ``use_engine`` (other ranks take None).

    ``serving`` (`adadecode serve`): every rank's stage gets ``serve.max_num_seqs`` cache slots.
    ``trace`` (``--trace``, on every rank alike): record events; rank 0's runner ends up with all.
    """
    import torch
    from adadecode.runtime.engine import PipelineEngine, load_rank
    from adadecode.runtime.runners.distributed import DistributedRunner
    from adadecode.runtime.transport import open_transport

    env, m, p = plan.env, cfg.model, cfg.pipeline
    rank = env.rank
    threads = p.threads or 1
    if p.pin_cpus and plan.world_size > 1:
        cores = pin_cpus(env.local_rank, threads)
        log.info("rank %d: %s", rank, f"pinned to cores {cores}" if cores else "not pinned (too few cores)")
    torch.set_num_threads(threads)
    try:
        resolved, config, _, loaded = load_rank(
            load_spec(cfg, serving=serving), rank=rank, backend=plan.backend, local_rank=env.local_rank,
            local_world_size=env.local_world_size or env.local_rank + 1,
        )
        stage = loaded.stage
        with open_transport(
            rank=rank, world_size=plan.world_size, local_rank=env.local_rank,
            master_addr=env.master_addr, master_port=env.master_port, backend=plan.backend,
            timeout_s=cfg.transport.timeout_s, join_timeout_s=cfg.transport.join_timeout_s,
            hidden_size=config.hidden_size, dtype=stage.model.dtype, stage_device=stage.model.device,
            control_addr=cfg.transport.control_addr,
        ) as transport:
            runner = DistributedRunner(stage, transport, step_timeout_s=cfg.transport.step_timeout_s, trace=trace)
            if rank != 0:
                runner.serve()
                return 0
            engine = PipelineEngine(resolved, config, runner, m.max_seq_len, max_inflight=loaded.max_inflight,
                                    heads_choice=loaded.heads_choice, generation_config=m.generation_config,
                                    lookup=loaded.lookup, draft=loaded.draft, table=loaded.table)
            code = use_engine(engine)
            runner.close()
            return code
    except (KeyboardInterrupt, Exception) as e:  # noqa: BLE001 - every rank names itself and the cause
        return report_error(e, f"rank {rank}: ")
