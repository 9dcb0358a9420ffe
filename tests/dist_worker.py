"""One rank of a test pipeline on a model directory, for tests/test_distributed.py.

Started by ``launcher.spawn.spawn_ranks`` (so RANK / WORLD_SIZE / ... are set).
Rank 0 greedy-decodes token-id prompts, each once per early-exit mode of
``--modes``, back to back on one pipeline: for every prompt, every mode in turn,
each run with a fresh Coordinator and the mode carried by the sequence itself.
With ``--sampling`` (a JSON list of ``SamplingParams`` fields) it samples instead,
every prompt under every entry in turn (``tokens[mode]`` then lists prompt by
prompt, each prompt's entries in order).
It writes ``{"tokens": {mode: [[...], ...]}, "stats": {mode: {...}}, "busy_s":
[...], "failures": [...], "runner": {...}}`` to ``--out``; every rank writes
what its stage still holds at the end to ``--out`` + ``.rank<r>``.

``--fail-runs I:N:KIND,...`` makes run I (counting from 0) fail at its N-th
verified token, from inside ``on_verified`` (``raise``: a RuntimeError, as a
caller's callback might; ``interrupt``: KeyboardInterrupt, as Ctrl-C on rank 0);
the run is then repeated, and must give the reference tokens on the slots the
failure freed. ``--fault RANK:KIND:N[:SECONDS]`` makes rank RANK misbehave once
its stage has handed out N events: ``kill`` (SIGKILL itself), ``hang`` (SIGSTOP
itself), ``raise`` (an exception) or ``slow`` (that one step takes SECONDS).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import torch
from adadecode.launcher.dist_env import read_dist_env
from adadecode.launcher.errors import report_error
from adadecode.runtime.coordinator import Coordinator
from adadecode.runtime.engine import load_rank
from adadecode.runtime.loading import LoadSpec
from adadecode.runtime.runners.distributed import DistributedRunner
from adadecode.runtime.sampling import SamplingParams
from adadecode.runtime.stopping import StopCriteria
from adadecode.runtime.transport import open_transport


def inject_fault(stage, kind: str, after: int, seconds: float) -> None:
    real = stage.next_action
    count = 0

    def next_action():
        nonlocal count
        out = real()
        if type(out).__name__ in ("Activations", "FinalPrediction", "EarlyPrediction"):
            count += 1
            if count == after:
                sys.stderr.write(f"dist_worker: rank {stage.index} injects `{kind}`\n")
                sys.stderr.flush()
                if kind == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                elif kind == "hang":
                    os.kill(os.getpid(), signal.SIGSTOP)
                elif kind == "slow":
                    time.sleep(seconds)  # one stage step longer than transport.timeout_s
                else:
                    raise RuntimeError("injected failure")
        return out

    stage.next_action = next_action


def failing_callback(after: int, kind: str):
    seen = 0

    def on_verified(event) -> None:
        nonlocal seen
        seen += len(event.tokens)
        if seen >= after:
            if kind == "interrupt":
                raise KeyboardInterrupt
            raise RuntimeError(f"callback failed at verified token {seen}")

    return on_verified


def held(stage, runner) -> dict:
    """What a stage (and its runner) still hold once every run is over."""
    return {
        "slots": sorted(stage.slots), "finished_held": len(stage.finished), "finished_floor": stage.finished.floor,
        "epochs": len(stage.epochs), "unsent": runner.unsent, "dropped_stale": stage.stats.dropped_stale,
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--split-points", default="")
    p.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--eos", type=int, default=-1)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--out", default="")
    p.add_argument("--fault", default="")
    p.add_argument("--fail-runs", default="")
    p.add_argument("--heads", default=None, help="exit-heads directory")
    p.add_argument("--modes", default="off")
    p.add_argument("--max-inflight", type=int, default=2)
    p.add_argument("--lookup", type=int, default=0, help="the Coordinator's context lookup (0: off)")
    p.add_argument("--draft", type=int, default=0, help="the Coordinator's drafts per request (0: none)")
    p.add_argument("--exit-layers", default="", help="comma list of the heads to use (default: the manifest's)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--sampling", default="", help="JSON list of SamplingParams fields (dicts); empty: greedy")
    a = p.parse_args()
    torch.set_num_threads(1)

    env = read_dist_env()
    split = [int(x) for x in a.split_points.split(",") if x]
    spec = LoadSpec(
        a.model, stages=env.world_size, split_points=split, max_seq_len=a.max_seq_len, heads=a.heads,
        device="cpu", dtype=a.dtype, exit_layers=tuple(int(x) for x in a.exit_layers.split(",") if x),
    )
    _, config, _, loaded = load_rank(spec, rank=env.rank)
    stage = loaded.stage
    if a.fault:
        rank, kind, after, *seconds = a.fault.split(":")
        if int(rank) == env.rank:
            inject_fault(stage, kind, int(after), float(seconds[0]) if seconds else 0.0)
    fail = {int(i): (int(n), kind) for i, n, kind in (f.split(":") for f in a.fail_runs.split(",") if f)}
    try:
        with open_transport(
            rank=env.rank, world_size=env.world_size, master_addr=env.master_addr, master_port=env.master_port,
            backend="gloo", timeout_s=a.timeout, hidden_size=config.hidden_size, dtype=stage.model.dtype,
        ) as t:
            runner = DistributedRunner(stage, t)
            if env.rank != 0:
                runner.serve()
                if a.out:
                    with open(f"{a.out}.rank{env.rank}", "w") as f:
                        json.dump(held(stage, runner), f)
                return 0
            eos = frozenset() if a.eos < 0 else frozenset([a.eos])
            modes = a.modes.split(",")
            samplings = [SamplingParams(**f) for f in json.loads(a.sampling)] if a.sampling else [None]
            prompts = [(p, sp) for p in json.loads(a.prompts) for sp in samplings]
            tokens = {m: [None] * len(prompts) for m in modes}
            counted = ("early_emitted", "accepted", "rollbacks", "lookup_emitted", "lookup_accepted", "drafted")
            stats = {m: {**{k: 0 for k in counted}, "elapsed_s": 0.0} for m in modes}
            failures, seq, run = [], 0, 0
            for i, (prompt, sampling) in enumerate(prompts):
                for mode in modes:  # back to back, a different mode each run
                    while tokens[mode][i] is None:
                        coord = Coordinator(max_inflight=a.max_inflight, lookup=a.lookup, draft=a.draft)
                        coord.add_sequence(
                            seq, prompt, StopCriteria(a.max_new_tokens, eos), early_exit=mode, sampling=sampling
                        )
                        seq += 1
                        t0 = time.perf_counter()
                        try:
                            runner.run(coord, failing_callback(*fail[run]) if run in fail else None)
                        except (KeyboardInterrupt, RuntimeError) as e:
                            if run not in fail:
                                raise
                            failures.append([run, type(e).__name__])
                            continue  # the same prompt and mode again, on the freed slots
                        finally:
                            run += 1
                        stats[mode]["elapsed_s"] += time.perf_counter() - t0
                        done = coord.sequences[seq - 1]
                        tokens[mode][i] = done.generated
                        for k in counted:
                            stats[mode][k] += getattr(done.stats, k)
            runner.close()
            if a.out:
                with open(a.out, "w") as f:
                    json.dump({"tokens": tokens, "stats": stats, "busy_s": runner.busy_s, "failures": failures,
                               "runner": {"unreleased": len(runner._unreleased), "broken": runner._broken}}, f)
                with open(f"{a.out}.rank0", "w") as f:
                    json.dump(held(stage, runner), f)
            return 0
    except (KeyboardInterrupt, Exception) as e:  # noqa: BLE001 - every rank names itself and the cause
        return report_error(e, f"rank {env.rank}: ")


if __name__ == "__main__":
    sys.exit(main())
