"""The multi-process pipeline: wire formats, the control plane's job key and liveness, and real
gloo jobs of 2 and 3 ranks (spawned with launcher/spawn.py, each with a deadline) that must give
the reference runner's tokens, with and without early exit and with runs of different modes
back to back; that must free every slot on every rank when a run fails, and survive a stage step
longer than the timeout; and that must exit cleanly, naming the rank and the cause, when a rank
dies, hangs or fails (status 2; the failing rank's own bug: a traceback and status 3).

Every job here starts processes that import torch; the module takes about 2 minutes on 2 cores.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zmq
from adadecode.launcher.spawn import spawn_ranks
from adadecode.runtime.events import (
    Activations,
    EarlyPrediction,
    FinalPrediction,
    Rollback,
    SequenceFinished,
    Shutdown,
    StepRequest,
)
from adadecode.runtime.sampling import Proposal, SamplingParams, TokenLogprobs
from adadecode.runtime.transport.control import (
    ControlClient,
    ControlServer,
    decode_event,
    encode_event,
)
from adadecode.runtime.transport.errors import TransportError
from adadecode.runtime.transport.p2p import (
    HEADER_FIELDS,
    KIND_ACTIVATIONS,
    decode_extras,
    decode_header,
    decode_proposals,
    encode_header,
    encode_proposals,
)
from helpers import (
    InProcessPipeline,
    bundled_model_dir,
    hf_greedy,
    save_identity_heads,
    save_tiny_model,
)

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "dist_worker.py"
PROMPTS = [[5, 17, 33, 2, 9, 41, 7], [1, 2, 3], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70]]
MAX_NEW_TOKENS = 24


# --------------------------------------------------------------- wire formats (no processes)


def test_header_carries_every_activations_field():
    act = Activations(7, 3, 41, 12, torch.zeros(5, 4), predict_from=43, emitted=True, early_exit="deferred",
                      lookup=1234)
    head = decode_header(encode_header(act))
    assert head == {"seq": 7, "epoch": 3, "pos": 41, "layer": 12, "S": 5, "predict_from": 43, "emitted": 1,
                    "early_exit": 2, "sampling": None, "proposals": 0, "tokens": 0, "lookup": 1234,
                    "kind": KIND_ACTIVATIONS}
    assert encode_header(act).dtype == torch.int64 and encode_header(act).shape == (len(HEADER_FIELDS),) == (23,)
    none = decode_header(encode_header(Activations(7, 3, 41, 12, torch.zeros(1, 4))))
    assert none["early_exit"] == -1 and none["lookup"] == -1
    bad = encode_header(act).clone()
    bad[HEADER_FIELDS.index("early_exit")] = 3
    with pytest.raises(TransportError, match="early_exit 3"):
        decode_header(bad)


def test_header_carries_sampling_parameters_and_proposals_follow():
    """Every SamplingParams field, floats bit for bit; proposals as their own float64 tensor."""
    params = SamplingParams(0.1 + 0.7, 0.95, 40, 1 / 3, 2**63 - 1, "speculative")
    proposals = (Proposal(42, 17, (17, 3, 9), (0.5, 0.25, 0.125)), Proposal(43, 1, (1,), (1.0,)))
    act = Activations(7, 3, 41, 12, torch.zeros(2, 4), sampling=params, proposals=proposals)
    flat = encode_proposals(proposals)
    head = decode_header(encode_header(act, flat.numel()))
    assert head["sampling"] == params and head["proposals"] == flat.numel() == 2 * 3 + 3 * 2 + 1 * 2
    assert decode_proposals(flat) == proposals
    with pytest.raises(TransportError, match="sampling parameters"):
        bad = encode_header(act).clone()
        bad[HEADER_FIELDS.index("top_k")] = -1
        decode_header(bad)


def test_header_carries_penalties_and_logprobs_and_token_ids_follow_the_proposals():
    """Penalties bit for bit, logprobs counts (None as -1), and the token ids of a sequence that
    needs them after the proposals in the one extras tensor."""
    params = SamplingParams(0.0, repetition_penalty=1 / 3 + 1, presence_penalty=-0.7, frequency_penalty=0.1 + 0.2,
                            logprobs=5, prompt_logprobs=None)
    proposals = (Proposal(42, 17, (17, 3), (0.5, 0.25)),)
    act = Activations(7, 3, 41, 12, torch.zeros(2, 4), sampling=params, proposals=proposals, tokens=(49151, 0))
    flat = encode_proposals(proposals)
    head = decode_header(encode_header(act, flat.numel()))
    assert head["sampling"] == params and head["tokens"] == 2
    extras = torch.cat([flat, torch.tensor(act.tokens, dtype=torch.float64)])
    assert decode_extras(extras, head["tokens"]) == (proposals, (49151, 0))
    assert decode_header(encode_header(Activations(1, 0, 0, 0, torch.zeros(1, 4))))["tokens"] == 0


@pytest.mark.parametrize(
    "event",
    [
        StepRequest(1, 2, 30, (5, 6)),
        StepRequest(1, 2, 30, (5, 6), "eager"),
        StepRequest(1, 2, 30, (5, 6), "eager", SamplingParams(0.8, 0.95, 5, 0.05, 12345, "speculative")),
        Rollback(1, 3, 29),
        SequenceFinished(1, "eos"),
        Shutdown(),
        FinalPrediction(1, 2, 31, 49151),
        FinalPrediction(1, 2, 31, 49151, TokenLogprobs(49151, -0.1 - 0.2, ((49151, -0.1 - 0.2), (7, -1 / 3)))),
        FinalPrediction(1, 0, 3, 5, TokenLogprobs(5, -2.5),
                        (TokenLogprobs(9, -1.0, ((9, -1.0),)), TokenLogprobs(1, -7.0))),
        StepRequest(1, 0, 0, (5, 6), "off", SamplingParams(repetition_penalty=1.2, logprobs=0, prompt_logprobs=3)),
        EarlyPrediction(1, 2, 32, 17, 12, 0.8125),
    ],
)
def test_control_events_round_trip(event):
    assert decode_event(json.loads(json.dumps(encode_event(event)))) == event


def _pair(timeout_s: float = 5.0, key: bytes = b"k" * 32):
    server = ControlServer(2, key, "127.0.0.1", timeout_s)
    client = ControlClient(1, server.endpoint, key, timeout_s, server.pulse_endpoint)
    server.wait_for_peers()
    return server, client


def _recv_until(endpoint, n: int = 1, seconds: float = 3.0) -> list:
    got, deadline = [], time.monotonic() + seconds
    while len(got) < n and time.monotonic() < deadline:
        got += endpoint.recv(0.05)
    return got


def test_control_plane_round_trip_and_job_key():
    server, client = _pair()
    rogue_ctx = zmq.Context()
    rogue = rogue_ctx.socket(zmq.DEALER)
    try:
        assert server.endpoint.startswith("tcp://127.0.0.1:")  # one node: loopback only
        server.send(1, "ev", encode_event(Rollback(0, 1, 9)))
        assert _recv_until(client) == [("ev", encode_event(Rollback(0, 1, 9)))]
        client.send("ev", encode_event(FinalPrediction(0, 1, 10, 42)))
        assert _recv_until(server) == [(1, "ev", encode_event(FinalPrediction(0, 1, 10, 42)))]

        # A process outside the job: a well-formed prediction claiming to be rank 1's but
        # without the job's key, and a malformed message: refused at the handshake (CURVE) and
        # counted (tests/test_control_plane_security.py has the rest).
        rogue.connect(server.endpoint)
        forged = json.dumps([1, 1, "ev", encode_event(FinalPrediction(0, 1, 11, 7))]).encode()
        rogue.send_multipart([b"\0" * 16, forged])
        rogue.send_multipart([b"junk"])
        time.sleep(0.3)
        assert server.recv(0.1) == [] and server.dropped >= 1
        assert client.recv(0.0) == []
    finally:
        rogue.close(0)
        rogue_ctx.term()
        client.close()
        server.close()


def test_control_plane_detects_a_peer_that_vanishes():
    server, client = _pair()
    try:
        client.close()  # no goodbye: as if the process died
        with pytest.raises(TransportError, match=r"rank 1 \(pid \d+ on .*\) closed its control connection"):
            _recv_until(server, 1, 3.0)
    finally:
        server.close()


def test_a_peer_busy_for_longer_than_the_timeout_is_alive_and_says_so():
    """Heartbeats come from a thread of their own: a rank whose loop computes (here: never calls
    recv) for twice the timeout is alive, and its heartbeats say how long its step has run."""
    server, client = _pair(timeout_s=0.5)
    try:
        client.busy_since = time.monotonic()
        assert _recv_until(server, 1, 1.0) == []  # 2 x timeout_s: no TransportError
        assert server.busy_for(1) > 0.5
        assert client.recv(0.0) == []  # and rank 0, whose loop was as quiet, is alive for the client
        client.busy_since = None
        time.sleep(0.2)
        assert server.busy_for(1) == 0.0
    finally:
        client.close()
        server.close()


def test_control_plane_detects_a_silent_peer():
    server, client = _pair(timeout_s=0.5)
    try:
        client.pulse.stop()  # what a stopped or wedged process looks like: no heartbeat any more
        with pytest.raises(TransportError, match=r"rank 1 .* has sent nothing for .*hangs"):
            _recv_until(server, 1, 3.0)
        with pytest.raises(TransportError, match="has sent nothing for"):  # and so on, at once
            server.recv(0.0)
    finally:
        client.close()
        server.close()


# ------------------------------------------------------------------------- gloo jobs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random model, untrained exit heads for it, and its plain greedy reference."""
    path = save_tiny_model(tmp_path_factory.mktemp("tiny"), "llama", seed=3)
    layers = [1, 2, 3, 4, 5]  # heads on every stage of every split used below
    thresholds = {l: 0.5 * (len(layers) - 1 - i) / (len(layers) - 1) for i, l in enumerate(layers)}
    heads = save_identity_heads(path, tmp_path_factory.mktemp("heads"), thresholds)
    ref = InProcessPipeline(path, [(0, 6)]).generate(PROMPTS[0], MAX_NEW_TOKENS)
    eos = ref[9]  # a token the model produces: some generations end on it, early
    refs = [InProcessPipeline(path, [(0, 6)]).generate(p, MAX_NEW_TOKENS, frozenset([eos])) for p in PROMPTS]
    assert hf_greedy(path, PROMPTS[0], MAX_NEW_TOKENS) == ref
    assert any(len(r) < MAX_NEW_TOKENS for r in refs) and any(len(r) == MAX_NEW_TOKENS for r in refs)
    return path, heads, eos, refs


def run_job(tmp_path: Path, world: int, *args: str, grace_s: float = 30.0, deadline_s: float = 120.0):
    out = tmp_path / f"job-{world}-{time.monotonic_ns()}.json"
    cmd = [sys.executable, str(WORKER), *args, "--out", str(out)]
    t0 = time.monotonic()
    exits = spawn_ranks(cmd, world, grace_s=grace_s, deadline_s=deadline_s)
    elapsed = time.monotonic() - t0
    for ex in exits:  # every rank was waited for: nothing is left running
        assert not Path(f"/proc/{ex.pid}").exists(), f"rank {ex.rank} (pid {ex.pid}) is still there"
    return exits, elapsed, json.loads(out.read_text()) if out.exists() else None


def assert_nothing_held(tmp_path: Path, world: int, sequences: int) -> None:
    """After the job, no rank's stage holds a slot, an epoch or a finished id one by one
    (every rank writes what it holds at its end)."""
    files = sorted(tmp_path.glob("job-*.json.rank*"))
    assert len(files) == world, files
    for r, h in enumerate(json.loads(f.read_text()) for f in files):
        assert h["slots"] == [] and h["epochs"] == 0, (r, h)
        # every finished id is remembered, in a watermark: gapless ids leave nothing in the set
        assert h["finished_held"] == 0 and h["finished_floor"] == sequences, (r, h)


@pytest.mark.parametrize("world, split, lookup, layers, draft", [
    (2, "3", 0, "", 0), (3, "2,4", 0, "", 0), (2, "3", 1, "4,5", 0), (3, "2,4", 1, "4,5", 3),
])
def test_ranks_give_the_reference_tokens_with_and_without_early_exit(tmp_path, tiny, world, split, lookup, layers,
                                                                     draft):
    """Every prompt in every mode, the modes back to back (off, eager, deferred, off, ...) on the
    same slots: each sequence carries its own mode, and each run starts once every rank has
    confirmed freeing the previous one's slot. With ``lookup`` and heads on the second rank only,
    the context's guesses ride the data plane to them; with ``draft``, the drafts' rows cross every
    rank and the last predicts each of them."""
    path, heads, eos, refs = tiny
    exits, _, out = run_job(
        tmp_path, world, "--model", str(path), "--split-points", split, "--prompts", json.dumps(PROMPTS),
        "--max-new-tokens", str(MAX_NEW_TOKENS), "--eos", str(eos), "--heads", str(heads),
        "--modes", "off,eager,deferred", "--lookup", str(lookup), "--exit-layers", layers, "--draft", str(draft),
    )
    assert [ex.returncode for ex in exits] == [0] * world, [ex.describe() for ex in exits]
    for mode in ("off", "eager", "deferred"):
        assert out["tokens"][mode] == refs, mode
    assert out["stats"]["off"]["early_emitted"] == 0
    for mode in ("eager", "deferred"):  # the premise: early tokens flowed and many were rolled back
        assert out["stats"][mode]["rollbacks"] >= 5 and out["stats"][mode]["accepted"] >= 1, out["stats"]
        assert (out["stats"][mode]["lookup_emitted"] > 0) == bool(lookup), out["stats"]
        assert (out["stats"][mode]["drafted"] > 0) == bool(draft), out["stats"]
    assert len(out["busy_s"]) == world and all(b > 0 for b in out["busy_s"])
    assert out["runner"] == {"unreleased": 0, "broken": None}
    assert_nothing_held(tmp_path, world, 3 * len(PROMPTS))


def in_process_tokens(path: Path, heads, prompts, samplings, modes, max_new_tokens: int, eos=frozenset(),
                      max_seq_len: int = 256) -> dict[str, list[list[int]]]:
    """What tests/dist_worker.py gives, from one in-process stage over the same model and heads."""
    from adadecode.runtime.coordinator import Coordinator
    from adadecode.runtime.loading import LoadSpec, build_stage, prepare
    from adadecode.runtime.runners.inprocess import LocalRunner
    from adadecode.runtime.stopping import StopCriteria

    spec = LoadSpec(str(path), heads=heads and str(heads), device="cpu", dtype="float32", max_seq_len=max_seq_len)
    resolved, config, ranges = prepare(spec)
    runner = LocalRunner([build_stage(spec, resolved, config, ranges, 0, device=torch.device("cpu"),
                                      dtype=torch.float32).stage])
    out, seq = {m: [] for m in modes}, 0
    for prompt in prompts:
        for sampling in samplings:
            for mode in modes:
                coord = Coordinator(max_inflight=2)
                coord.add_sequence(seq, prompt, StopCriteria(max_new_tokens, eos), early_exit=mode, sampling=sampling)
                runner.run(coord)
                out[mode].append(coord.sequences[seq].generated)
                seq += 1
    return out


SAMPLINGS = [SamplingParams(0.8, top_p=0.95, seed=0), SamplingParams(0.8, top_p=0.95, seed=1),
             SamplingParams(1.0, seed=2, mode="speculative")]


def test_ranks_sample_as_one_process_does(tmp_path, tiny):
    """Sampling on 2 ranks, its parameters on the data plane's header and, in speculative mode, the
    heads' proposals (a stage-0 head's q) behind the hidden states: every mode gives the tokens of
    one in-process stage, and seeded sampling gives plain seeded sampling's in every mode."""
    path, heads, eos, _ = tiny
    modes = ("off", "eager", "deferred")
    fields = [dataclasses.asdict(sp) for sp in SAMPLINGS]
    exits, _, out = run_job(
        tmp_path, 2, "--model", str(path), "--split-points", "3", "--prompts", json.dumps(PROMPTS),
        "--max-new-tokens", str(MAX_NEW_TOKENS), "--eos", str(eos), "--heads", str(heads),
        "--modes", ",".join(modes), "--sampling", json.dumps(fields),
    )
    assert [ex.returncode for ex in exits] == [0, 0], [ex.describe() for ex in exits]
    refs = in_process_tokens(path, heads, PROMPTS, SAMPLINGS, modes, MAX_NEW_TOKENS, frozenset([eos]))
    for mode in modes:  # for deferred, the CPU fp32 property (tests/test_early_exit.py), not a rule
        assert out["tokens"][mode] == refs[mode], mode
    seeded = [i for i in range(len(out["tokens"]["off"])) if SAMPLINGS[i % len(SAMPLINGS)].mode == "seeded"]
    for mode in modes:
        assert [out["tokens"][mode][i] for i in seeded] == [refs["off"][i] for i in seeded], mode
    spec = [i for i in range(len(out["tokens"]["off"])) if i not in seeded]
    assert any(out["tokens"]["eager"][i] != out["tokens"]["off"][i] for i in spec)  # proposals were drawn
    for mode in ("eager", "deferred"):
        assert out["stats"][mode]["rollbacks"] >= 5 and out["stats"][mode]["accepted"] >= 1, out["stats"]


@pytest.mark.slow  # the bundled model, for many tokens
@pytest.mark.timeout(600)  # ranks with a 300 s deadline, then the reference in this process
def test_bundled_model_samples_alike_on_two_ranks(tmp_path):
    """Seeded sampling (temperature 0.8, top_p 0.95, two seeds) on 2 gloo ranks of the bundled
    model with its shipped heads: off, eager and deferred give the tokens of plain seeded
    sampling in one process (deferred: the CPU fp32 property, tests/test_sampling_parity.py)."""
    bundled_model_dir()
    from adadecode.runtime.engine import Engine
    from adadecode.runtime.prompts import select_prompts

    engine = Engine.load("bundled:smollm2-135m-instruct", stages=1, heads=None)
    prompts = [engine.encode(p, chat=isinstance(p, list))
               for p in select_prompts(str(ROOT / "data/prompts/heldout.jsonl"), 2)]
    samplings = SAMPLINGS[:2]
    modes = ("off", "eager", "deferred")
    exits, _, out = run_job(
        tmp_path, 2, "--model", "bundled:smollm2-135m-instruct", "--heads", "auto", "--prompts", json.dumps(prompts),
        "--max-new-tokens", "32", "--max-seq-len", "512", "--modes", ",".join(modes),
        "--sampling", json.dumps([dataclasses.asdict(sp) for sp in samplings]), deadline_s=300,
    )
    assert [ex.returncode for ex in exits] == [0, 0], [ex.describe() for ex in exits]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    eos = engine.eos_token_ids
    engine.eos_token_ids = frozenset()  # the worker stops at max_new_tokens only
    try:
        refs = [engine.generate(ids, max_new_tokens=32, sampling=sp).tokens for ids in prompts for sp in samplings]
    finally:
        engine.eos_token_ids = eos
        torch.set_num_threads(threads)
    for mode in modes:
        assert out["tokens"][mode] == refs, mode
    assert out["stats"]["eager"]["early_emitted"] > 20 and out["stats"]["deferred"]["early_emitted"] > 20


@pytest.mark.parametrize("world, split", [(2, "3"), (3, "2,4")])
def test_bf16_ranks_give_transformers_bf16_tokens(tmp_path, tiny, world, split):
    """The device path with an explicit model.device=cpu and model.dtype=bfloat16 through 2 and 3
    ranks (bf16 hidden states on the wire): the tokens of transformers' generate in bf16, early
    exit off and eager."""
    path, heads, _, _ = tiny
    refs = [hf_greedy(path, p, MAX_NEW_TOKENS, dtype=torch.bfloat16) for p in PROMPTS]
    assert refs[0] != hf_greedy(path, PROMPTS[0], MAX_NEW_TOKENS)  # the premise: bf16 decodes differently here
    exits, _, out = run_job(
        tmp_path, world, "--model", str(path), "--split-points", split, "--prompts", json.dumps(PROMPTS),
        "--max-new-tokens", str(MAX_NEW_TOKENS), "--heads", str(heads), "--modes", "off,eager", "--dtype", "bfloat16",
    )
    assert [ex.returncode for ex in exits] == [0] * world, [ex.describe() for ex in exits]
    assert out["tokens"]["off"] == refs and out["tokens"]["eager"] == refs
    assert out["stats"]["eager"]["early_emitted"] > 0


def test_a_failed_run_frees_its_slots_on_every_rank(tmp_path, tiny):
    """Runs that fail inside ``run()`` — the caller's callback raising, an interrupt on rank 0 —
    in the middle of a sequence whose early tokens are in flight: every rank frees the slot
    (one slot per stage here, so a leak would fail the next run), and the same prompt and mode
    run again right after give the reference tokens."""
    path, heads, eos, refs = tiny
    exits, _, out = run_job(
        tmp_path, 2, "--model", str(path), "--split-points", "3", "--prompts", json.dumps(PROMPTS[:2]),
        "--max-new-tokens", str(MAX_NEW_TOKENS), "--eos", str(eos), "--heads", str(heads),
        "--modes", "eager,deferred,off", "--fail-runs", "0:3:raise,2:2:interrupt,4:2:raise",
    )
    assert [ex.returncode for ex in exits] == [0, 0], [ex.describe() for ex in exits]
    assert out["failures"] == [[0, "RuntimeError"], [2, "KeyboardInterrupt"], [4, "RuntimeError"]]
    for mode in ("eager", "deferred", "off"):
        assert out["tokens"][mode] == refs[:2], mode
    assert out["runner"] == {"unreleased": 0, "broken": None}
    assert_nothing_held(tmp_path, 2, 2 * 3 + 3)


def test_a_stage_step_longer_than_the_timeout_is_not_a_hang(tmp_path, tiny):
    """Rank 1 spends 1.5 x transport.timeout_s in one stage step (a long prefill on a slow
    machine): its pulse thread keeps it alive and tells rank 0 it is computing, so nobody
    declares a hang (after 0.8 x timeout_s of silence) or a stall (after timeout_s without
    progress), and the tokens are the reference's."""
    path, _, eos, refs = tiny
    timeout = 4.0
    exits, _, out = run_job(
        tmp_path, 2, "--model", str(path), "--prompts", json.dumps(PROMPTS[:1]),
        "--max-new-tokens", str(MAX_NEW_TOKENS), "--eos", str(eos), "--timeout", str(timeout),
        "--fault", f"1:slow:3:{1.5 * timeout}",
    )
    assert [ex.returncode for ex in exits] == [0, 0], [ex.describe() for ex in exits]
    assert out["tokens"]["off"] == refs[:1]
    assert out["stats"]["off"]["elapsed_s"] > 1.5 * timeout


def test_a_killed_rank_stops_every_other_rank_with_its_name(tmp_path, tiny, capfd):
    path, _, _, _ = tiny
    timeout = 20.0
    exits, elapsed, out = run_job(
        tmp_path, 3, "--model", str(path), "--split-points", "2,4", "--prompts", json.dumps(PROMPTS * 4),
        "--max-new-tokens", str(MAX_NEW_TOKENS), "--timeout", str(timeout), "--fault", "1:kill:20",
        grace_s=timeout,
    )
    err = capfd.readouterr().err
    assert out is None
    assert exits[1].returncode == -signal.SIGKILL
    # The others exited by themselves (2: a user-facing error naming the rank), not by the
    # supervisor's SIGTERM after the grace period.
    assert exits[0].returncode == 2 and exits[2].returncode == 2, [ex.describe() for ex in exits]
    dead = f"rank 1 (pid {exits[1].pid} on "
    assert f"adadecode: error: rank 0: {dead}" in err and "closed its control connection" in err, err
    # Rank 2 hears it from rank 0, or first from its own data-plane link to rank 1.
    assert ("adadecode: error: rank 2: stopped by rank 0: TransportError: " + dead in err
            or "adadecode: error: rank 2: rank 1 closed its data-plane connection: the process died" in err), err
    assert elapsed < timeout + 30, elapsed


def test_a_hung_rank_is_found_by_its_silence(tmp_path, tiny, capfd):
    path, _, _, _ = tiny
    timeout = 8.0
    exits, _, out = run_job(
        tmp_path, 2, "--model", str(path), "--prompts", json.dumps(PROMPTS * 4),
        "--max-new-tokens", str(MAX_NEW_TOKENS), "--timeout", str(timeout), "--fault", "1:hang:10",
        grace_s=1.0,
    )
    err = capfd.readouterr().err
    assert out is None and exits[0].returncode == 2, [ex.describe() for ex in exits]
    assert f"adadecode: error: rank 0: rank 1 (pid {exits[1].pid} on " in err and "has sent nothing for" in err, err
    assert exits[1].returncode in (-signal.SIGTERM, -signal.SIGKILL)  # the stopped rank is reaped too


def test_a_failing_rank_reports_its_error_to_every_rank(tmp_path, tiny, capfd):
    path, _, _, _ = tiny
    exits, _, out = run_job(
        tmp_path, 2, "--model", str(path), "--prompts", json.dumps(PROMPTS),
        "--max-new-tokens", str(MAX_NEW_TOKENS), "--fault", "1:raise:5", grace_s=20.0,
    )
    err = capfd.readouterr().err
    # Rank 1's own error is a bug (a RuntimeError inside its stage): traceback and status 3;
    # rank 0 names rank 1 and its cause in one line, status 2.
    assert out is None and [ex.returncode for ex in exits] == [2, 3], [ex.describe() for ex in exits]
    assert "Traceback (most recent call last)" in err, err
    assert "adadecode: internal error: rank 1: RuntimeError: injected failure" in err, err
    assert f"adadecode: error: rank 0: rank 1 (pid {exits[1].pid} on " in err, err
    assert "failed: RuntimeError: injected failure" in err, err


# ------------------------------------------------------------------- the bundled model


@pytest.mark.slow  # the bundled model, for many tokens
@pytest.mark.timeout(600)  # a job with a 300 s deadline, then the reference in this process
def test_bundled_model_on_two_spawned_ranks_matches_one_process(tmp_path):
    """`adadecode generate --stages 2` (the default multi-stage run: two spawned gloo ranks)."""
    bundled_model_dir()
    from adadecode.runtime.engine import Engine
    from adadecode.runtime.prompts import select_prompts

    prompts = select_prompts(str(ROOT / "data/prompts/heldout.jsonl"), 3)
    file = tmp_path / "p.jsonl"
    file.write_text(
        "".join(json.dumps({"messages": p} if isinstance(p, list) else {"prompt": p}) + "\n" for p in prompts)
    )
    cmd = [sys.executable, "-m", "adadecode.launcher.cli", "generate", "--stages", "2", "--prompts", str(file),
           "--json", "--max-new-tokens", "32", "--decoding.heads=none"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    engine = Engine.load("bundled:smollm2-135m-instruct", stages=1, heads=None)
    assert len(records) == len(prompts)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on two busy cores crawl
    try:
        refs = [engine.generate(prompt, max_new_tokens=32).tokens for prompt in prompts]
    finally:
        torch.set_num_threads(threads)
    for rec, ref in zip(records, refs):
        assert rec["tokens"] == ref
        assert rec["stats"]["stages"] == [[0, 19], [19, 30]]
        busy = rec["stats"]["stage_busy_fraction"]
        assert len(busy) == 2 and all(0 < f <= 1 for f in busy)


def test_a_rank_that_waits_past_the_join_timeout_says_what_to_raise():
    """Ranks join once each has loaded its stage; a peer that never comes (still compiling, or
    dead) ends the wait after transport.join_timeout_s with a message naming it."""
    import datetime
    import socket

    from adadecode.runtime.transport import _init_process_group

    with socket.socket() as s:  # a port nobody listens on: rank 0 never comes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(TransportError, match=r"failed within 2 s: .*raise transport.join_timeout_s"):
        _init_process_group("gloo", 1, 2, "127.0.0.1", port, datetime.timedelta(seconds=60),
                            datetime.timedelta(seconds=2))
    assert time.monotonic() - t0 < 30
