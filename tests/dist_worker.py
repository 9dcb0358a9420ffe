"""One rank of a test pipeline on a model directory, for tests/test_distributed.py.

Started by ``launcher.spawn.spawn_ranks`` (so RANK / WORLD_SIZE / ... are set).
Rank 0 greedy-decodes token-id prompts with a fresh Coordinator each, once per
early-exit mode of ``--modes`` (set on every stage the way ``Engine.generate``
does: on rank 0's stage views, relayed by the runner), and writes
``{"tokens": {mode: [[...], ...]}, "stats": {...}, "busy_s": [...]}`` to
``--out``. ``--fault RANK:KIND:N``
makes rank RANK misbehave once its stage has handed out N events: ``kill``
(SIGKILL itself), ``hang`` (SIGSTOP itself) or ``raise`` (an exception).
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
from adadecode.runtime.coordinator import Coordinator
from adadecode.runtime.loading import LoadSpec, load_rank
from adadecode.runtime.runners.distributed import DistributedRunner
from adadecode.runtime.stopping import StopCriteria
from adadecode.runtime.transport import open_transport


def inject_fault(stage, kind: str, after: int) -> None:
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
                else:
                    raise RuntimeError("injected failure")
        return out

    stage.next_action = next_action


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
    p.add_argument("--heads", default=None, help="exit-heads directory")
    p.add_argument("--modes", default="off")
    p.add_argument("--max-inflight", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    a = p.parse_args()
    torch.set_num_threads(1)

    env = read_dist_env()
    split = [int(x) for x in a.split_points.split(",") if x]
    spec = LoadSpec(
        a.model, stages=env.world_size, split_points=split, max_seq_len=a.max_seq_len, heads=a.heads,
        device="cpu", dtype=a.dtype,
    )
    _, config, _, loaded = load_rank(spec, rank=env.rank)
    stage = loaded.stage
    if a.fault:
        rank, kind, after = a.fault.split(":")
        if int(rank) == env.rank:
            inject_fault(stage, kind, int(after))
    try:
        with open_transport(
            rank=env.rank, world_size=env.world_size, master_addr=env.master_addr, master_port=env.master_port,
            backend="gloo", timeout_s=a.timeout, hidden_size=config.hidden_size, dtype=stage.model.dtype,
        ) as t:
            runner = DistributedRunner(stage, t)
            if env.rank != 0:
                runner.serve()
                return 0
            eos = frozenset() if a.eos < 0 else frozenset([a.eos])
            tokens, stats, seq = {}, {}, 0
            for mode in a.modes.split(","):
                for s in runner.stages:
                    s.policy = mode
                tokens[mode], stats[mode] = [], {"early_emitted": 0, "accepted": 0, "rollbacks": 0, "elapsed_s": 0.0}
                for prompt in json.loads(a.prompts):
                    coord = Coordinator(max_inflight=0 if mode == "off" else a.max_inflight)
                    coord.add_sequence(seq, prompt, StopCriteria(a.max_new_tokens, eos))
                    t0 = time.perf_counter()
                    runner.run(coord)
                    stats[mode]["elapsed_s"] += time.perf_counter() - t0
                    done = coord.sequences[seq]
                    tokens[mode].append(done.generated)
                    for k in ("early_emitted", "accepted", "rollbacks"):
                        stats[mode][k] += getattr(done.stats, k)
                    seq += 1
            runner.close()
            if a.out:
                with open(a.out, "w") as f:
                    json.dump({"tokens": tokens, "stats": stats, "busy_s": runner.busy_s}, f)
            return 0
    except Exception as e:
        print(f"adadecode: error: rank {env.rank}: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
