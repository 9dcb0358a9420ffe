"""Where this process sits in a multi-process job: the one place that reads it.

Launchers tell each process its rank through environment variables; this
module reads them, in this order, and nowhere else in the project does:

1. ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``,
   set by torchrun, by the DeepSpeed launcher (which also sets ``LOCAL_SIZE``
   where torchrun sets ``LOCAL_WORLD_SIZE``) and by ``adadecode generate
   --stages N`` for the ranks it spawns;
2. Slurm's ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID``, the node's task count
   (local world size) from ``SLURM_STEP_TASKS_PER_NODE``, ``SLURM_TASKS_PER_NODE`` or
   ``SLURM_NTASKS_PER_NODE`` (``2(x2)``: two nodes of two tasks), the first host
   of ``SLURM_JOB_NODELIST`` (``node[01-04,07]`` is expanded here, no
   ``scontrol`` needed) as the master unless ``MASTER_ADDR`` is set, and a port
   from ``MASTER_PORT`` or derived from ``SLURM_JOB_ID`` so that two jobs on one
   node do not collide — in a task that ``srun`` started (``SLURM_STEP_ID`` is a
   job step's). A batch script's own shell (no ``SLURM_STEP_ID``) and an
   interactive allocation's shell (``salloc``'s interactive step) carry
   ``SLURM_PROCID=0`` and the allocation's task count too, but they are no rank
   of anything: what they run without ``srun`` is a single process, and
   ``--stages N`` there spawns N local ranks as on any machine;
3. otherwise a single process: rank 0 of 1.

    env = read_dist_env()          # os.environ
    env = read_dist_env({"RANK": "1", "WORLD_SIZE": "2", ...})   # tests
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["DistEnv", "DistEnvError", "expand_nodelist", "read_dist_env"]

# Ports derived from SLURM_JOB_ID fall in [_PORT_BASE, _PORT_BASE + _PORT_SPAN),
# below Linux's default ephemeral range (32768+) so they rarely clash with a client socket.
_PORT_BASE = 15000
_PORT_SPAN = 15000


class DistEnvError(ValueError):
    """The launcher's environment variables contradict each other; the message says which."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int  # 0: not set (a single process picks a free port if it needs one)
    launcher: str  # "torchrun" (also the DeepSpeed launcher and our own spawn), "slurm", or "none"
    local_world_size: int | None = None  # ranks on this node, when the launcher says

    @property
    def under_launcher(self) -> bool:
        """Started by torchrun, Slurm, DeepSpeed or a spawning `adadecode`: this process is one rank."""
        return self.launcher != "none"


def read_dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """This process's rank, world size, local rank and rendezvous address (see module docstring)."""
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env:
        return _from_torchrun(env)
    if "SLURM_PROCID" in env and _srun_task(env):
        return _from_slurm(env)
    return DistEnv(0, 1, 0, "127.0.0.1", 0, "none", 1)


# Step ids Slurm gives to what is not a step that srun launched (slurm.h: SLURM_PENDING_STEP,
# SLURM_EXTERN_CONT, SLURM_BATCH_SCRIPT, SLURM_INTERACTIVE_STEP; 0xfffffff0 and up are reserved).
_SPECIAL_STEP_IDS = 0xFFFFFFF0


def _srun_task(env: Mapping[str, str]) -> bool:
    """Whether this process is a task of a job step that srun started: only those have a rank.
    The batch script's shell sets no step id; salloc's interactive step has a reserved one."""
    raw = (env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID") or "").strip()
    return raw.isdigit() and int(raw) < _SPECIAL_STEP_IDS


def _int(env: Mapping[str, str], name: str, source: str) -> int:
    raw = env.get(name)
    if raw is None:
        raise DistEnvError(f"{name} is not set but the other {source} variables are; {_FIX[source]}")
    try:
        value = int(raw.strip(), 10)
    except ValueError:
        raise DistEnvError(f"{name}={raw!r} is not an integer; {_FIX[source]}") from None
    if value < 0:
        raise DistEnvError(f"{name}={value} is negative; {_FIX[source]}")
    return value


_FIX = {
    "torchrun": "launch with torchrun (or the DeepSpeed launcher), which sets RANK, WORLD_SIZE, LOCAL_RANK, "
    "MASTER_ADDR and MASTER_PORT together, or unset them all to run a single process",
    "slurm": "start the ranks with `srun` inside the allocation (see scripts/slurm/adadecode.sbatch), "
    "or unset SLURM_PROCID to run a single process",
}


def _check_ranks(rank: int, world: int, local: int, names: tuple[str, str, str], source: str) -> None:
    r, w, lr = names
    if world < 1:
        raise DistEnvError(f"{w}={world}: a job has at least one rank; {_FIX[source]}")
    if rank >= world:
        raise DistEnvError(f"{r}={rank} is not below {w}={world}: ranks are 0..{world - 1}; {_FIX[source]}")
    if local > rank:
        raise DistEnvError(
            f"{lr}={local} is larger than {r}={rank}: ranks are numbered node by node, so a rank's "
            f"local rank never exceeds its global rank; {_FIX[source]}"
        )


def _port(raw: str, name: str) -> int:
    try:
        port = int(raw.strip(), 10)
    except ValueError:
        raise DistEnvError(f"{name}={raw!r} is not a port number; set it to a free TCP port such as 29500") from None
    if not 1 <= port <= 65535:
        raise DistEnvError(f"{name}={port} is not a TCP port (1..65535); set it to a free port such as 29500")
    return port


def _from_torchrun(env: Mapping[str, str]) -> DistEnv:
    rank = _int(env, "RANK", "torchrun")
    world = _int(env, "WORLD_SIZE", "torchrun")
    local = _int(env, "LOCAL_RANK", "torchrun") if "LOCAL_RANK" in env else rank if world == 1 else None
    if local is None:
        raise DistEnvError(f"LOCAL_RANK is not set but RANK and WORLD_SIZE are; {_FIX['torchrun']}")
    _check_ranks(rank, world, local, ("RANK", "WORLD_SIZE", "LOCAL_RANK"), "torchrun")
    local_world = None
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):  # torchrun, DeepSpeed launcher
        if name in env:
            local_world = _int(env, name, "torchrun")
            if not local < local_world <= world:
                raise DistEnvError(
                    f"{name}={local_world} does not fit LOCAL_RANK={local} and WORLD_SIZE={world} "
                    f"(expected LOCAL_RANK < {name} <= WORLD_SIZE); {_FIX['torchrun']}"
                )
            break
    addr = env.get("MASTER_ADDR", "").strip()
    port_raw = env.get("MASTER_PORT", "").strip()
    if world > 1 and (not addr or not port_raw):
        missing = " and ".join(n for n, v in (("MASTER_ADDR", addr), ("MASTER_PORT", port_raw)) if not v)
        raise DistEnvError(f"{missing} not set for a {world}-rank job; {_FIX['torchrun']}")
    return DistEnv(
        rank, world, local, addr or "127.0.0.1", _port(port_raw, "MASTER_PORT") if port_raw else 0,
        "torchrun", local_world,
    )


def _from_slurm(env: Mapping[str, str]) -> DistEnv:
    rank = _int(env, "SLURM_PROCID", "slurm")
    ntasks = "SLURM_NTASKS" if "SLURM_NTASKS" in env else "SLURM_NPROCS"
    world = _int(env, ntasks, "slurm")
    local = _int(env, "SLURM_LOCALID", "slurm")
    _check_ranks(rank, world, local, ("SLURM_PROCID", ntasks, "SLURM_LOCALID"), "slurm")
    addr = env.get("MASTER_ADDR", "").strip()
    if not addr:
        nodelist_var = next((v for v in ("SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(v)), None)
        if nodelist_var is None:
            if world > 1:
                raise DistEnvError(
                    f"neither MASTER_ADDR nor SLURM_JOB_NODELIST is set for a {world}-task Slurm job; "
                    f"{_FIX['slurm']}, or export MASTER_ADDR"
                )
            addr = "127.0.0.1"
        else:
            addr = expand_nodelist(env[nodelist_var], nodelist_var)[0]
    if env.get("MASTER_PORT", "").strip():
        port = _port(env["MASTER_PORT"], "MASTER_PORT")
    elif env.get("SLURM_JOB_ID", "").strip():
        port = _PORT_BASE + _int(env, "SLURM_JOB_ID", "slurm") % _PORT_SPAN
    elif world > 1:
        raise DistEnvError(
            f"neither MASTER_PORT nor SLURM_JOB_ID is set for a {world}-task Slurm job; export MASTER_PORT"
        )
    else:
        port = 0
    local_world = _slurm_tasks_on_this_node(env, local, world)
    if local_world is None and env.get("SLURM_NNODES", "").strip() == "1":
        local_world = world
    return DistEnv(rank, world, local, addr, port, "slurm", local_world)


# Where Slurm says how many tasks run on each node, most precise first: the step's own layout (what
# srun started), the job's, and the --ntasks-per-node the user asked for (set only with that option).
_TASKS_PER_NODE = ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE")
_TASKS_SPEC = re.compile(r"(\d+)(?:\(x(\d+)\))?")  # `2`, `2(x3)`: 2 tasks on each of 3 nodes


def _slurm_tasks_on_this_node(env: Mapping[str, str], local: int, world: int) -> int | None:
    """This node's task count (the local world size) from Slurm's per-node task lists, e.g.
    ``2(x2)`` (2 nodes of 2) or ``3,2(x2)`` (this node's entry by ``SLURM_NODEID`` where they
    differ: the step's list counts the step's nodes, ``SLURM_STEP_NODEID``); None when none is set."""
    for name in _TASKS_PER_NODE:
        raw = env.get(name, "").strip()
        if not raw:
            continue
        counts: list[int] = []
        for part in raw.split(","):
            m = _TASKS_SPEC.fullmatch(part.strip())
            if m is None:
                raise DistEnvError(f"{name}={raw!r} is not a Slurm task count list such as `2` or `2(x2)` or "
                                   f"`3,2(x2)`; {_FIX['slurm']}")
            counts += [int(m.group(1))] * int(m.group(2) or 1)
        if len(set(counts)) == 1:
            count = counts[0]
        else:
            node_var = "SLURM_STEP_NODEID" if name == "SLURM_STEP_TASKS_PER_NODE" else "SLURM_NODEID"
            node = _int(env, node_var, "slurm") if node_var in env else None
            if node is None or node >= len(counts):
                raise DistEnvError(f"{name}={raw!r} differs between nodes, and {node_var}="
                                   f"{env.get(node_var)!r} does not say which is this one; {_FIX['slurm']}")
            count = counts[node]
        if not local < count <= world:
            raise DistEnvError(
                f"{name}={raw!r} gives {count} tasks on this node, which does not fit SLURM_LOCALID={local} "
                f"and {world} tasks in all (expected SLURM_LOCALID < tasks on the node <= all tasks); {_FIX['slurm']}"
            )
        return count
    return None


# ------------------------------------------------------------------- nodelists


def expand_nodelist(nodelist: str, name: str = "nodelist") -> list[str]:
    """Host names of a Slurm nodelist: ``"node[01-03,07],gpu5"`` -> node01 node02 node03 node07 gpu5
    (python-hostlist, the parser Slurm sites use; its errors get the variable's name and a fix)."""
    import hostlist

    text = nodelist.strip()
    if not text:
        raise DistEnvError(f"{name} is empty; expected host names such as `node[01-04,07]`")
    try:
        hosts = hostlist.expand_hostlist(text)
    except hostlist.BadHostlist as e:
        raise DistEnvError(
            f"{name}={text!r} is not a Slurm nodelist ({e}); expected host names such as `node[01-04,07]`, "
            "or export MASTER_ADDR"
        ) from None
    if not hosts:
        raise DistEnvError(f"{name}={text!r} names no host; expected host names such as `node[01-04,07]`")
    return hosts
