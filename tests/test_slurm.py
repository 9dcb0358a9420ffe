"""Real Slurm: jobs on the one-node cluster of scripts/slurm/local_cluster.sh (slurmctld, slurmd
and munged on this machine; CI starts it in .ci/run). The module is skipped while it is down.

- the shipped scripts/slurm/adadecode.sbatch, unchanged, submitted with sbatch: two tasks, two
  gloo ranks of the bundled model, the tokens of one in-process stage;
- a rank SIGKILLed under srun (its pid from `scontrol listpids`): rank 0 names it and exits 2,
  srun and the job end, no process of the job is left;
- `scancel` of a serving job (`adadecode serve` on two ranks under srun): every rank exits 0, as
  its own wrapper reports in the job's output (no slurmdbd here, so no sacct: the job's state
  comes from `scontrol show job`).

Jobs are awaited by polling `scontrol show job` (every 0.3 s) rather than with `sbatch --wait`,
whose polling interval doubles up to 32 s (a 13 s job took 42 s to return).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import bundled_greedy_tokens, bundled_model_dir, save_tiny_chat_model

ROOT = Path(__file__).resolve().parent.parent
SBATCH_SCRIPT = ROOT / "scripts" / "slurm" / "adadecode.sbatch"
SLURM_DIR = Path(os.environ.get("ADADECODE_SLURM_DIR", "/tmp/adadecode-slurm"))
SLURM_CONF = SLURM_DIR / "slurm.conf"
START = "scripts/slurm/local_cluster.sh start"
PROMPT = "Explain rainbows."
NEW_TOKENS = 12
TIMEOUT_S = 10  # transport.timeout_s of the jobs that fail on purpose


def _cluster_down() -> str | None:
    """Why the local cluster cannot take jobs, or None when it can."""
    missing = [t for t in ("sbatch", "srun", "scontrol", "scancel", "sinfo") if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install -y --no-install-recommends slurm-wlm munge)"
    if not SLURM_CONF.exists():
        return f"no {SLURM_CONF}"
    for daemon in ("munged", "slurmctld", "slurmd"):  # at once, rather than sinfo's 10 s of retries
        pid = (SLURM_DIR / f"{daemon}.pid").read_text().strip() if (SLURM_DIR / f"{daemon}.pid").exists() else ""
        if not pid.isdigit() or not Path(f"/proc/{pid}").exists():
            return f"{daemon} is not running"
    try:
        state = subprocess.run(["sinfo", "--noheader", "--format", "%T"], capture_output=True, text=True, timeout=10,
                               env={**os.environ, "SLURM_CONF": str(SLURM_CONF)}).stdout.split()
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 10 s"
    if not {"idle", "mixed", "allocated"} & set(state):
        return f"sinfo reports no usable node ({state or 'no answer'})"
    return None


_down = _cluster_down()
if _down is not None:
    pytest.skip(f"the local Slurm cluster is not up ({_down}); start it with `{START}` "
                "(or run .ci/run, which does)", allow_module_level=True)

pytestmark = pytest.mark.distributed


def slurm_env(**extra: str) -> dict[str, str]:
    """This environment for Slurm's commands and the jobs they start (sbatch and srun pass it on):
    the local cluster's config, this interpreter's `adadecode` first on PATH, no launcher
    variables inherited from an enclosing job."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "TORCHELASTIC_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["SLURM_CONF"] = str(SLURM_CONF)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def slurm(*args: str, timeout: float = 30) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=slurm_env())
    assert proc.returncode == 0, f"{' '.join(args)}: {proc.stderr}"
    return proc.stdout


def job_fields(job: str) -> dict[str, str]:
    """`scontrol show job` as a dict ({} once the job is gone)."""
    proc = subprocess.run(["scontrol", "--oneliner", "show", "job", job], capture_output=True, text=True,
                          timeout=30, env=slurm_env())
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout)) if proc.returncode == 0 else {}


def wait_for_job(job: str, deadline_s: float) -> dict[str, str]:
    """Poll until the job has ended (its state final, its processes gone); cancel it if it does not."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        fields = job_fields(job)
        state = fields.get("JobState", "")
        if state and state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED"):
            return fields
        time.sleep(0.3)
    subprocess.run(["scancel", "--signal=KILL", "--full", job], env=slurm_env(), timeout=30)
    pytest.fail(f"job {job} did not end within {deadline_s} s: {job_fields(job)}")


def job_pids(job: str) -> dict[int, int | None]:
    """pid -> global task id (None for a task's child processes) of the job's processes on this node."""
    proc = subprocess.run(["scontrol", "listpids", job], capture_output=True, text=True, timeout=30, env=slurm_env())
    pids = {}
    for line in proc.stdout.splitlines()[1:]:
        pid, _, _, _, task = line.split()
        pids[int(pid)] = None if task == "-" else int(task)
    return pids


def running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for_text(path: Path, needle: str, proc: subprocess.Popen, deadline_s: float) -> str:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        text = path.read_text() if path.exists() else ""
        if needle in text:
            return text
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    pytest.fail(f"no {needle!r} within {deadline_s} s (srun status {proc.returncode}): {path.read_text()}")


def job_of(name: str, deadline_s: float = 30) -> str:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        job = slurm("squeue", "--noheader", f"--name={name}", "--format=%i").strip()
        if job:
            return job
        time.sleep(0.2)
    pytest.fail(f"no job named {name}")


@pytest.fixture(scope="module")
def reference() -> list[int]:
    """The prompt's greedy tokens from one in-process stage of the bundled model."""
    return bundled_greedy_tokens(PROMPT, NEW_TOKENS)


@pytest.mark.timeout(300)
def test_the_shipped_sbatch_script_decodes_like_one_stage(tmp_path, reference):
    """`sbatch scripts/slurm/adadecode.sbatch` as shipped; only the allocation is overridden on the
    command line (the script asks for 2 nodes x 1 task x 4 CPUs; this cluster is one node of 2)."""
    out = tmp_path / "adadecode-%j.out"
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10",
         f"--job-name=adadecode-sbatch-{os.getpid()}", f"--output={out}", f"--chdir={ROOT}", str(SBATCH_SCRIPT),
         "--prompt", PROMPT, "--chat", "--max-new-tokens", str(NEW_TOKENS), "--json"],
        capture_output=True, text=True, timeout=30, env=slurm_env(),
    )
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    fields = wait_for_job(job, 240)
    text = Path(str(out).replace("%j", job)).read_text()
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), text
    assert re.search(rf"adadecode: 2 ranks on 1 node\(s\), rendezvous at \S+:{15000 + int(job) % 15000}\n", text), text
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert len(records) == 1, text
    assert records[0]["tokens"] == reference
    assert records[0]["stats"]["stages"] == [[0, 19], [19, 30]]  # two ranks, one stage each


@pytest.mark.timeout(300)
def test_a_rank_killed_under_srun_is_named_and_nothing_is_left(tmp_path):
    """srun starts two ranks; once rank 0 streams text, rank 1 (its pid from `scontrol listpids`)
    gets SIGKILL: rank 0 names it within transport.timeout_s and exits 2, srun reports both tasks
    and ends, the job is FAILED, and none of its processes is left."""
    bundled_model_dir()
    name = f"adadecode-kill-{os.getpid()}"
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with out.open("w") as o, err.open("w") as e:
        srun = subprocess.Popen(
            ["srun", "--ntasks=2", "--cpus-per-task=1", f"--job-name={name}", "--time=10", f"--wait={TIMEOUT_S + 30}",
             "adadecode", "generate", "--stages", "2", "--prompt", PROMPT, "--chat", "--max-new-tokens", "400",
             "--model.max_seq_len=512", f"--transport.timeout_s={TIMEOUT_S}", "--decoding.heads=none"],
            stdout=o, stderr=e, env=slurm_env(), cwd=ROOT,
        )
    try:
        job = job_of(name)
        end = time.monotonic() + 120
        while not out.read_text().strip() and srun.poll() is None and time.monotonic() < end:
            time.sleep(0.1)  # the text streams once both ranks decode
        assert out.read_text().strip(), f"rank 0 printed nothing: {err.read_text()}"
        pids = job_pids(job)
        victim = next(pid for pid, task in pids.items() if task == 1)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        srun.wait(timeout=TIMEOUT_S + 60)
        elapsed = time.monotonic() - killed
    finally:
        if srun.poll() is None:
            srun.kill()
            srun.wait()
    text = err.read_text()
    host = socket.gethostname()
    assert srun.returncode != 0, text
    assert (f"adadecode: error: rank 0: rank 1 (pid {victim} on {host}) closed its control connection "
            "without saying goodbye: the process died") in text, text
    assert re.search(r"srun: error: \S+: task 1: Killed", text), text
    assert re.search(r"srun: error: \S+: task 0: Exited with exit code 2", text), text
    assert elapsed < TIMEOUT_S, elapsed
    assert wait_for_job(job, 60)["JobState"] == "FAILED"
    assert not [pid for pid in pids if running(pid)], pids


@pytest.mark.timeout(300)
def test_scancel_of_a_serving_job_ends_every_rank_with_status_0(tmp_path):
    """`adadecode serve` on two ranks under srun (a tiny model with the bundled tokenizer): it
    answers a request; `scancel` (SIGTERM to every task) ends serving: rank 0 stops the others in
    order and every rank exits 0, as a wrapper around each rank writes to the job's output."""
    model = save_tiny_chat_model(tmp_path / "model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    name = f"adadecode-serve-{os.getpid()}"
    # The wrapper's trap only notes the signal: `sh` waits for the rank and then reports its status.
    wrapper = ('trap "echo rank $SLURM_PROCID: SIGTERM >&2" TERM; "$@"; '
               'echo "rank $SLURM_PROCID: exit status $?" >&2')
    out = tmp_path / "job.txt"
    with out.open("w") as o:
        srun = subprocess.Popen(
            ["srun", "--ntasks=2", "--cpus-per-task=1", f"--job-name={name}", "--time=10", "--label",
             "sh", "-c", wrapper, "sh",
             "adadecode", "serve", "--stages", "2", "--model", str(model), "--model.max_seq_len=256",
             "--pipeline.compile=off", "--port", str(port), f"--transport.timeout_s={TIMEOUT_S}"],
            stdout=o, stderr=subprocess.STDOUT, env=slurm_env(), cwd=ROOT,
        )
    try:
        job = job_of(name)
        wait_for_text(out, "adadecode: ready:", srun, 120)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({"prompt": "The capital of France is", "max_tokens": 4}).encode(),
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.loads(response.read())["usage"]["completion_tokens"] == 4
        pids = job_pids(job)
        assert sorted(t for t in pids.values() if t is not None) == [0, 1], pids
        slurm("scancel", job)
        srun.wait(timeout=60)
    finally:
        if srun.poll() is None:
            srun.kill()
            srun.wait()
    text = out.read_text()
    for rank in (0, 1):
        assert f"{rank}: rank {rank}: SIGTERM" in text, text  # the signal reached every task
        assert f"{rank}: rank {rank}: exit status 0" in text, text
    assert "Traceback" not in text and "error: rank" not in text, text
    fields = wait_for_job(job, 60)
    assert fields["JobState"] == "CANCELLED", fields
    assert not [pid for pid in pids if running(pid)], pids
