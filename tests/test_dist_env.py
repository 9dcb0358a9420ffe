"""launcher/dist_env.py against faked launcher environments, and the launch plan built on it."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from adadecode.launcher.config import ConfigError, load_config
from adadecode.launcher.dist_env import (
    DistEnv,
    DistEnvError,
    expand_nodelist,
    read_dist_env,
)
from adadecode.launcher.distributed import plan_launch

TORCHRUN = {
    "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29500",
    "TORCHELASTIC_RUN_ID": "none", "GROUP_RANK": "1",
}
DEEPSPEED = {  # what deepspeed/launcher/launch.py sets
    "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_SIZE": "2",
    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "CROSS_RANK": "0", "CROSS_SIZE": "1",
}
SLURM = {  # a task of `srun` (step 0) in a 4-node job
    "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NNODES": "4",
    "SLURM_JOB_NODELIST": "gpu-node[07-09,12]", "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0",
}


def test_no_launcher_is_a_single_process():
    env = read_dist_env({"PATH": "/usr/bin"})
    assert env == DistEnv(0, 1, 0, "127.0.0.1", 0, "none", 1)
    assert not env.under_launcher


def test_torchrun():
    env = read_dist_env(TORCHRUN)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert (env.master_addr, env.master_port, env.launcher) == ("10.1.2.3", 29500, "torchrun")
    assert env.under_launcher


def test_deepspeed_launcher_sets_the_same_variables():
    env = read_dist_env(DEEPSPEED)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (1, 2, 1, 2)
    assert (env.master_addr, env.master_port) == ("127.0.0.1", 29500)


def test_torchrun_wins_over_slurm():
    # `srun torchrun ...`: both are set, and the rank torchrun gives is the one that counts.
    env = read_dist_env({**SLURM, **TORCHRUN})
    assert (env.rank, env.launcher) == (3, "torchrun")


def test_slurm():
    env = read_dist_env(SLURM)
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (5, 8, 1, "slurm")
    assert env.master_addr == "gpu-node07"  # first host of the compressed nodelist
    assert env.master_port == 15000 + 123456 % 15000  # derived from the job id: stable across the job's tasks
    assert env.local_world_size is None  # several nodes: not known from these variables


def test_slurm_master_and_port_from_the_environment_win():
    env = read_dist_env({**SLURM, "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "29400"})
    assert (env.master_addr, env.master_port) == ("10.0.0.9", 29400)


def test_slurm_older_variable_names_and_single_node():
    env = read_dist_env({
        "SLURM_PROCID": "0", "SLURM_NPROCS": "2", "SLURM_LOCALID": "0", "SLURM_NNODES": "1",
        "SLURM_NODELIST": "localhost", "SLURM_JOB_ID": "7", "SLURM_STEPID": "2",
    })
    assert (env.world_size, env.master_addr, env.master_port, env.local_world_size) == (2, "localhost", 15007, 2)


# Two nodes of two tasks each (`sbatch -N2 --ntasks-per-node=2`, then `srun`): what each task sees
TWO_BY_TWO = {
    "SLURM_NTASKS": "4", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_ID": "42",
    "SLURM_STEP_ID": "0", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    "SLURM_NTASKS_PER_NODE": "2",
}


@pytest.mark.parametrize("procid,nodeid,localid", [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)])
def test_slurm_two_nodes_of_two_tasks(procid, nodeid, localid):
    env = read_dist_env({**TWO_BY_TWO, "SLURM_PROCID": str(procid), "SLURM_NODEID": str(nodeid),
                         "SLURM_LOCALID": str(localid)})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (procid, 4, localid, 2)
    assert env.master_addr == "n1"


@pytest.mark.parametrize(
    "extra, local_world",
    [
        ({"SLURM_TASKS_PER_NODE": "2(x2)"}, 2),  # the job's layout alone
        ({"SLURM_NTASKS_PER_NODE": "2"}, 2),  # only what was asked for
        ({"SLURM_STEP_TASKS_PER_NODE": "2,1", "SLURM_STEP_NODEID": "0"}, 2),  # uneven: this node's entry
        ({"SLURM_TASKS_PER_NODE": "1,2(x2)", "SLURM_NODEID": "2"}, 2),
        ({"SLURM_TASKS_PER_NODE": "3", "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}, 2),  # the step's wins
        ({}, None),  # several nodes and no per-node count: not known
    ],
)
def test_slurm_local_world_size_from_the_tasks_per_node(extra, local_world):
    base = {k: v for k, v in TWO_BY_TWO.items() if "TASKS_PER_NODE" not in k}
    env = read_dist_env({**base, **extra, "SLURM_PROCID": "3", "SLURM_LOCALID": "1"})
    assert env.local_world_size == local_world


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ({"SLURM_TASKS_PER_NODE": "2(x"}, "SLURM_TASKS_PER_NODE='2(x' is not a Slurm task count list"),
        ({"SLURM_TASKS_PER_NODE": "1(x2)"}, "gives 1 tasks on this node, which does not fit SLURM_LOCALID=1"),
        ({"SLURM_TASKS_PER_NODE": "3,1"}, "differs between nodes, and SLURM_NODEID=None"),
    ],
)
def test_slurm_bad_tasks_per_node_is_named(extra, fragment):
    base = {k: v for k, v in TWO_BY_TWO.items() if "TASKS_PER_NODE" not in k}
    with pytest.raises(DistEnvError, match=re.escape(fragment)):
        read_dist_env({**base, **extra, "SLURM_PROCID": "3", "SLURM_LOCALID": "1"})


# What Slurm 22.05 sets in a batch script's shell (sbatch -n2) and in salloc's interactive step
# (LaunchParameters=use_interactive_step), as printed on the local cluster (tests/test_slurm.py).
SBATCH_SHELL = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NPROCS": "2", "SLURM_LOCALID": "0",
                "SLURM_NODEID": "0", "SLURM_JOB_ID": "19", "SLURM_JOB_NODELIST": "vm", "SLURM_TASK_PID": "3247"}
SALLOC_SHELL = {**SBATCH_SHELL, "SLURM_STEP_ID": "4294967290", "SLURM_STEPID": "4294967290",
                "SLURM_STEP_NUM_TASKS": "1"}


@pytest.mark.parametrize("environ", [SBATCH_SHELL, SALLOC_SHELL], ids=["sbatch-shell", "salloc-interactive-step"])
def test_a_slurm_shell_is_not_a_rank(environ):
    """`sbatch --wrap "adadecode generate --stages 2"` or the same typed in an interactive
    allocation: no srun, so no rank of a Slurm job (it used to wait for a rank 1 that never
    came, or refuse --stages 2 with WORLD_SIZE=1): a single process, which spawns its ranks."""
    env = read_dist_env(environ)
    assert env == DistEnv(0, 1, 0, "127.0.0.1", 0, "none", 1) and not env.under_launcher
    assert plan_launch(load_config(["--pipeline.stages=2"]), env).mode == "spawn"


def test_slurm_different_job_ids_get_different_ports():
    ports = {read_dist_env({**SLURM, "SLURM_JOB_ID": str(j)}).master_port for j in range(100, 110)}
    assert len(ports) == 10


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node01", ["node01"]),
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("a[1-2],b3,c[09-11]", ["a1", "a2", "b3", "c09", "c10", "c11"]),
        ("gpu-node[7]", ["gpu-node7"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("host.example.com,other", ["host.example.com", "other"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    "nodelist, fragment",
    [
        ("", "empty"),
        ("node[01-04", "is not a Slurm nodelist (unbalanced brackets)"),
        ("node01]", "is not a Slurm nodelist (unbalanced brackets)"),
        ("node[a-b]", "is not a Slurm nodelist (bad range)"),
        ("node[4-1]", "is not a Slurm nodelist (start > stop)"),
        ("n[1[2]]", "is not a Slurm nodelist (nested brackets)"),
        (",", "names no host"),
    ],
)
def test_bad_nodelists_are_named(nodelist, fragment):
    with pytest.raises(DistEnvError) as info:
        expand_nodelist(nodelist, "SLURM_JOB_NODELIST")
    assert fragment in str(info.value) and "SLURM_JOB_NODELIST" in str(info.value)


@pytest.mark.parametrize(
    "environ, fragments",
    [
        ({"RANK": "0"}, ["WORLD_SIZE is not set", "torchrun"]),
        ({"WORLD_SIZE": "2"}, ["RANK is not set"]),
        ({**TORCHRUN, "RANK": "4"}, ["RANK=4 is not below WORLD_SIZE=4", "0..3"]),
        ({**TORCHRUN, "RANK": "x"}, ["RANK='x' is not an integer"]),
        ({**TORCHRUN, "WORLD_SIZE": "0", "RANK": "0", "LOCAL_RANK": "0"}, ["WORLD_SIZE=0"]),
        ({**TORCHRUN, "LOCAL_RANK": "5"}, ["LOCAL_RANK=5 is larger than RANK=3"]),
        ({k: v for k, v in TORCHRUN.items() if k != "LOCAL_RANK"}, ["LOCAL_RANK is not set"]),
        ({k: v for k, v in TORCHRUN.items() if k != "MASTER_ADDR"}, ["MASTER_ADDR not set for a 4-rank job"]),
        ({**TORCHRUN, "MASTER_PORT": "99999"}, ["MASTER_PORT=99999 is not a TCP port"]),
        ({**TORCHRUN, "LOCAL_WORLD_SIZE": "1"}, ["LOCAL_WORLD_SIZE=1 does not fit LOCAL_RANK=1"]),
        ({**SLURM, "SLURM_PROCID": "8"}, ["SLURM_PROCID=8 is not below SLURM_NTASKS=8", "srun"]),
        ({k: v for k, v in SLURM.items() if k != "SLURM_NTASKS"}, ["SLURM_NPROCS is not set"]),
        ({k: v for k, v in SLURM.items() if k != "SLURM_LOCALID"}, ["SLURM_LOCALID is not set"]),
        ({k: v for k, v in SLURM.items() if k != "SLURM_JOB_NODELIST"}, ["neither MASTER_ADDR nor SLURM_JOB_NODELIST"]),
        ({k: v for k, v in SLURM.items() if k != "SLURM_JOB_ID"}, ["neither MASTER_PORT nor SLURM_JOB_ID"]),
        ({**SLURM, "SLURM_JOB_NODELIST": "n[1-"}, ["SLURM_JOB_NODELIST", "unbalanced brackets"]),
    ],
)
def test_inconsistent_environments_get_a_clear_error(environ, fragments):
    with pytest.raises(DistEnvError) as info:
        read_dist_env(environ)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


# ------------------------------------------------------------------ launch plans

SINGLE = DistEnv(0, 1, 0, "127.0.0.1", 0, "none", 1)


@pytest.mark.parametrize(
    "argv, mode, backend, world",
    [
        ([], "inprocess", "inprocess", 1),
        (["--pipeline.stages=3"], "spawn", "gloo", 3),  # the default run for N > 1
        (["--pipeline.stages=3", "--transport.backend=inprocess"], "inprocess", "inprocess", 1),
        (["--pipeline.stages=2", "--transport.backend=nccl"], "spawn", "nccl", 2),
        (["--transport.backend=nccl"], "rank", "nccl", 1),  # one GPU rank in this process
    ],
)
def test_plan_without_a_launcher(argv, mode, backend, world):
    plan = plan_launch(load_config(argv), SINGLE)
    assert (plan.mode, plan.backend, plan.world_size) == (mode, backend, world)


def test_plan_under_a_launcher_is_one_rank():
    env = read_dist_env(TORCHRUN)
    plan = plan_launch(load_config(["--pipeline.stages=4"]), env)
    assert (plan.mode, plan.backend, plan.world_size) == ("rank", "gloo", 4)
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=4.*--pipeline.stages=4"):
        plan_launch(load_config(["--pipeline.stages=2"]), env)
    with pytest.raises(ConfigError, match=r"transport.backend = 'inprocess'.*WORLD_SIZE=4"):
        plan_launch(load_config(["--pipeline.stages=4", "--transport.backend=inprocess"]), env)


# ------------------------------------------- the sbatch script's rendezvous address

SBATCH_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "slurm" / "adadecode.sbatch"
FAKE_SLURM = {  # stand-ins that record their calls: the script's logic without a cluster
    "scontrol": 'echo "scontrol $*" >>"$CALLS"; echo n1; echo n2',
    "srun": 'echo "srun $*" >>"$CALLS"\ncase " $* " in *" hostname "*) echo "$HEAD_ADDRS" ;;'
            ' *) echo "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT" ;; esac',
}


def run_sbatch_script(tmp_path: Path, nodes: int, head_addrs: str, **env: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in FAKE_SLURM.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    slurm = {"SLURM_JOB_NODELIST": "n[1-2]" if nodes > 1 else "n1", "SLURM_JOB_NUM_NODES": str(nodes),
             "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "1"}
    environ = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(tmp_path / "calls"),
               "HEAD_ADDRS": head_addrs, **slurm, **env}
    return subprocess.run(["bash", str(SBATCH_SCRIPT), "--prompt", "hi"], capture_output=True, text=True,
                          env=environ, timeout=30)


@pytest.mark.parametrize(
    "nodes, head_addrs, master",
    [
        (2, "10.0.0.5", "10.0.0.5"),
        (2, "127.0.1.1 10.0.0.5", "10.0.0.5"),  # the first address that is not loopback
        (1, "127.0.0.1", "127.0.0.1"),  # one node: loopback reaches every rank
    ],
)
def test_sbatch_script_exports_the_head_nodes_address(tmp_path, nodes, head_addrs, master):
    proc = run_sbatch_script(tmp_path, nodes, head_addrs)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"MASTER_ADDR={master} MASTER_PORT=15007"
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[1] == "srun --nodes=1 --ntasks=1 -w n1 hostname --ip-address"
    assert "adadecode generate" in calls[-1] and calls[-1].endswith("--prompt hi")


def test_sbatch_script_refuses_a_loopback_head_address_across_nodes(tmp_path):
    """Several nodes whose head resolves its own name to 127.0.1.1: the other ranks could never
    reach it (they used to wait TIMEOUT_S and fail); the script says so and starts nothing."""
    proc = run_sbatch_script(tmp_path, 2, "127.0.1.1")
    assert proc.returncode == 2
    assert "n1 resolves its own name to 127.0.1.1, a loopback address" in proc.stderr
    assert "export MASTER_ADDR=" in proc.stderr
    assert not any("adadecode" in c for c in (tmp_path / "calls").read_text().splitlines())


def test_sbatch_script_uses_a_given_master_addr_as_is(tmp_path):
    proc = run_sbatch_script(tmp_path, 2, "127.0.1.1", MASTER_ADDR="10.9.8.7", MASTER_PORT="29400")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "MASTER_ADDR=10.9.8.7 MASTER_PORT=29400"
    assert not any("hostname" in c for c in (tmp_path / "calls").read_text().splitlines())
