"""Start N local ranks of a command and supervise them, as torchrun does on one node.

``adadecode generate|bench|serve --stages N`` (not under another launcher) re-runs its own
command line as N child processes with ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT`` set,
the environment torchrun would give them, and waits:

- the children share this terminal: rank 0 prints the output, every rank its errors;
- when a rank fails, the others get ``grace_s`` to notice it on their own and
  exit with their message (they do, through the control plane, within
  ``transport.timeout_s``); whoever is left after that is sent SIGTERM, then
  SIGKILL;
- SIGTERM to this process is passed on to every rank, as torchrun does (each
  rank decides how to end: `serve` ends in order, see launcher/launch.py), and
  the ranks are waited for as usual;
- every child is waited for before this returns, and on Linux a child also
  gets SIGTERM if this process dies first (``PR_SET_PDEATHSIG``), so no rank
  outlives its launcher.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass


@dataclass
class RankExit:
    rank: int
    pid: int
    returncode: int

    def describe(self) -> str:
        if self.returncode < 0:
            return f"rank {self.rank} (pid {self.pid}) was killed by {signal.Signals(-self.returncode).name}"
        return f"rank {self.rank} (pid {self.pid}) exited with code {self.returncode}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spawn_ranks(
    command: list[str],
    world_size: int,
    *,
    grace_s: float = 60.0,
    env: dict[str, str] | None = None,
    on_exit=None,
    deadline_s: float | None = None,
) -> list[RankExit]:
    """Run ``command`` as ranks ``0..world_size-1`` on this host; return how each ended, by rank.

    ``on_exit(RankExit)`` is called as each rank ends (the CLI reports failures with it).
    ``deadline_s`` bounds the whole job (tests): past it every rank still running is stopped.
    """
    started = time.monotonic()
    base = dict(os.environ if env is None else env)
    base.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    base.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    procs: list[subprocess.Popen] = []
    exits: dict[int, RankExit] = {}
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: _signal_all(procs, signal.SIGTERM))
    try:
        for rank in range(world_size):
            child_env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
            preexec = _die_with_parent if sys.platform.startswith("linux") else None
            procs.append(subprocess.Popen(command, env=child_env, preexec_fn=preexec))
        failed_at = None
        while len(exits) < world_size:
            for rank, p in enumerate(procs):
                if rank in exits or p.poll() is None:
                    continue
                exits[rank] = RankExit(rank, p.pid, p.returncode)
                if on_exit is not None:
                    on_exit(exits[rank])
                if p.returncode != 0 and failed_at is None:
                    failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                break
            if deadline_s is not None and time.monotonic() - started > deadline_s:
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        # From a terminal every rank got the SIGINT too: give them a moment to exit on their
        # own before passing it on (a `kill -INT` reached only this process).
        _wait_all(procs, 2.0)
        _signal_all(procs, signal.SIGINT)
        _wait_all(procs, 5.0)
        raise
    finally:
        _reap(procs, exits, on_exit)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return [exits[r] for r in range(len(procs))]


def _signal_all(procs: list[subprocess.Popen], sig: signal.Signals) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)


def _wait_all(procs: list[subprocess.Popen], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass


def _reap(procs: list[subprocess.Popen], exits: dict[int, RankExit], on_exit) -> None:
    """SIGTERM, then SIGKILL, whatever still runs; wait for every child."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.terminate()
        try:
            os.kill(p.pid, signal.SIGCONT)  # a stopped (hung) rank acts on SIGTERM only once continued
        except ProcessLookupError:
            pass
    _wait_all(alive, 5.0)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    for rank, p in enumerate(procs):
        if rank not in exits:
            exits[rank] = RankExit(rank, p.pid, p.returncode)
            if on_exit is not None:
                on_exit(exits[rank])
