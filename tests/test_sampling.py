"""Sampling (runtime/sampling.py): parameters and their errors, the counter-based noise, logit
processing, and the two guarantees on a tiny model in process.

- seeded: tokens are a function of (prompt, seed): identical with early exit off, eager and
  deferred, on 1, 2 and 3 stages, with untrained heads that are mostly wrong (so verification
  rolls back often). tests/test_sampling_parity.py checks the same on the bundled model.
- speculative: a chi-square test, through the pipeline, of the first token's distribution
  against the final layer's processed distribution p. Threshold: the test passes when its
  p-value exceeds ALPHA = 1e-3. The draws use seeds 0..N-1, so the test is deterministic:
  a correct sampler fails it for one choice of seeds in a thousand, and this choice passes.
  The same test rejects, with p-values below 1e-12 on the same proposals, the head's own
  distribution q (keeping every proposal) and a sampler that resamples from p instead of
  from the residual max(0, p - q), so it cannot pass by accident.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from unittest import mock

import pytest
import torch
from adadecode.launcher.config import ConfigError, load_config
from adadecode.runtime import sampling
from adadecode.runtime.coordinator import Coordinator
from adadecode.runtime.exit_heads import ExitHeads
from adadecode.runtime.hf_adapter import ModelArgs, load_hf_config, load_stage_modules
from adadecode.runtime.model_runner import StageModel
from adadecode.runtime.params import MAX_SEED, MAX_TEMPERATURE, MAX_TOP_K, MIN_TEMPERATURE, SAMPLING_MODES
from adadecode.runtime.runners.inprocess import LocalRunner
from adadecode.runtime.sampling import SamplingParams
from adadecode.runtime.stage import Stage
from adadecode.runtime.stopping import StopCriteria
from helpers import make_engine, save_tiny_model

ALPHA = 1e-3  # the chi-square test's threshold: pass when p-value > ALPHA

# --- parameters ---------------------------------------------------------------------------------

BAD = [
    ({"temperature": -0.5}, "temperature", ">= 0"),
    ({"temperature": float("inf")}, "temperature", "finite"),
    ({"temperature": "hot"}, "temperature", "finite number"),
    ({"temperature": 1e-300}, "temperature", r"0 \(greedy decoding\) or a number in \[0.01, 100\]"),
    ({"temperature": 1e-3}, "temperature", r"\[0.01, 100\]"),
    ({"temperature": 1e9}, "temperature", r"\[0.01, 100\]"),
    ({"top_k": 2**63}, "top_k", "<= 2147483647"),
    ({"top_p": 0.0}, "top_p", r"\(0, 1\]"),
    ({"top_p": 1.5}, "top_p", r"\(0, 1\]"),
    ({"top_k": -1}, "top_k", ">= 0"),
    ({"top_k": 2.5}, "top_k", "an integer"),
    ({"min_p": -0.1}, "min_p", r"\[0, 1\]"),
    ({"min_p": 1.01}, "min_p", r"\[0, 1\]"),
    ({"seed": -1}, "seed", "2\\*\\*63"),
    ({"seed": 2**63}, "seed", "2\\*\\*63"),
    ({"mode": "lucky"}, "mode", "seeded, speculative"),
]


@pytest.mark.parametrize("kw, name, expected", BAD, ids=[f"{k}={v}" for (kw, _, _) in BAD for k, v in kw.items()])
def test_bad_parameters_are_refused_naming_the_parameter(kw, name, expected):
    with pytest.raises(ValueError, match=rf"sampling parameter {name} = .* is invalid: expected .*{expected}"):
        SamplingParams(**kw)


@pytest.mark.parametrize("kw, name, expected", [b for b in BAD if not isinstance(next(iter(b[0].values())), str)])
def test_the_config_refuses_what_sampling_params_refuses(kw, name, expected):
    """The config checks sampling values through runtime/params.py: the same refusals, named by key."""
    ((key, value),) = kw.items()
    if key == "temperature" and value == float("inf"):
        value = "inf"
    with pytest.raises(ConfigError, match=rf"invalid sampling\.{name} = "):
        load_config([f"--sampling.{key}={value}"])


def test_the_edges_are_allowed_by_both():
    edges = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 1.0, "seed": 2**63 - 1, "mode": "speculative"}
    cfg = load_config([f"--sampling.{k}={v}" for k, v in edges.items()])
    assert SamplingParams(**dataclasses.asdict(cfg.sampling)) == SamplingParams(**edges)
    assert SamplingParams(**edges).greedy and not SamplingParams(temperature=1e-2).greedy


@pytest.mark.parametrize(
    "flags, name",
    [
        (["--temperature", "-1"], "sampling.temperature"),
        (["--top-p", "0"], "sampling.top_p"),
        (["--top-p", "1.5"], "sampling.top_p"),
        (["--top-k", "-3"], "sampling.top_k"),
        (["--min-p", "2"], "sampling.min_p"),
        (["--seed", "-1"], "sampling.seed"),
        (["--sampling", "lucky"], "sampling.mode"),
        (["--temperature", "warm"], "sampling.temperature"),
    ],
)
def test_cli_refuses_bad_sampling_flags_with_status_2(flags, name, capsys):
    from adadecode.launcher.cli import main

    for command in ("generate", "bench"):
        assert main([command, "--prompt", "x", *flags] if command == "generate" else [command, *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"adadecode: error: invalid {name} = "), err
        assert len(err.strip().splitlines()) == 1, err


# --- the noise ---------------------------------------------------------------------------------


def test_noise_is_a_function_of_seed_position_stream_and_id_alone():
    ids = torch.arange(5000)
    u = sampling.uniforms(7, 42, ids)
    some = torch.tensor([4999, 3, 1234, 3])
    assert torch.equal(sampling.uniforms(7, 42, some), u[some])  # any subset, any order: the same entries
    assert torch.equal(sampling.uniforms(7, 42, ids), u)  # and again
    for other in [sampling.uniforms(8, 42, ids), sampling.uniforms(7, 43, ids), sampling.uniforms(7, 42, ids, 1)]:
        assert (other != u).float().mean() > 0.99
    assert bool(((u > 0) & (u < 1)).all())
    # Pinned: a change of generator changes every seeded output; it must be on purpose.
    assert sampling.uniforms(0, 0, torch.arange(4)).tolist() == [
        0.7348459661006927, 0.7712670862674713, 0.33594194054603577, 0.05320271849632263
    ]
    assert sampling.uniforms(12345, 678, torch.tensor([0, 49151]), sampling.ACCEPT).tolist() == [
        0.787555068731308, 0.4299904406070709
    ]


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square goodness of fit; cells expecting fewer than 5 are pooled."""
    counts, expected = counts.double(), probs.double() * counts.sum()
    keep = expected >= 5
    observed = torch.cat([counts[keep], counts[~keep].sum()[None]])
    expected = torch.cat([expected[keep], expected[~keep].sum()[None]])
    if expected[-1] == 0:  # nothing to pool: drop the empty cell (and its observations, none)
        assert observed[-1] == 0, "draws where the distribution has no mass"
        observed, expected = observed[:-1], expected[:-1]
    stat = ((observed - expected) ** 2 / expected).sum()
    dof = torch.tensor((len(expected) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, stat / 2))


def test_uniforms_are_uniform_across_ids_and_across_seeds():
    across_ids = sampling.uniforms(3, 17, torch.arange(1 << 16))
    across_seeds = torch.cat([sampling.uniforms(s, 17, torch.zeros(1, dtype=torch.long), 1) for s in range(20000)])
    for u in (across_ids, across_seeds):
        counts = torch.histc(u.float(), bins=50, min=0, max=1)
        assert chi_square_p_value(counts, torch.full((50,), 1 / 50)) > ALPHA


def test_gumbel_argmax_draws_from_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0, -float("inf")])
    counts = torch.zeros(6)
    for seed in range(4000):
        counts[sampling.gumbel_argmax(logits, None, seed, 9)] += 1
    assert counts[5] == 0
    assert chi_square_p_value(counts, logits.softmax(-1)) > ALPHA


# --- processing ----------------------------------------------------------------------------------


def reference_processing(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The same filters by a full sort, as a reader would write them (on logits shifted to a top of 0)."""
    x = (logits.float() - logits.float().max()) / p.temperature
    if p.top_k:
        x[x < x.sort(descending=True).values[min(p.top_k, x.numel()) - 1]] = -float("inf")
    if p.top_p < 1:
        probs = x.softmax(-1)
        ranked = probs.sort(descending=True).values
        n = int((ranked.cumsum(0) < p.top_p).sum())
        x[probs < ranked[min(n, x.numel() - 1)]] = -float("inf")
    if p.min_p:
        probs = x.softmax(-1)
        x[probs < p.min_p * probs.max()] = -float("inf")
    return x


@pytest.mark.parametrize(
    "params",
    [SamplingParams(0.7), SamplingParams(1.3, top_k=5), SamplingParams(0.8, top_p=0.95),
     SamplingParams(1.0, top_p=0.999), SamplingParams(2.0, top_p=0.9, top_k=300, min_p=0.01),
     SamplingParams(0.5, min_p=0.2)],
    ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}",
)
def test_processing_keeps_the_support_the_filters_define(params):
    gen = torch.Generator().manual_seed(0)
    for scale in (0.1, 1.0, 4.0):  # flat rows need the nucleus search to widen past its first guess
        logits = torch.randn(2000, generator=gen) * scale
        assert torch.equal(sampling.process_logits(logits, params), reference_processing(logits, params))


def test_a_head_draws_with_the_noise_entries_of_its_own_ids():
    """A restricted head whose logits are the final layer's, restricted: it proposes the final
    layer's token whenever that token is in its vocabulary (seeded mode's coupling)."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(300, generator=gen)
    ids = torch.randperm(300, generator=gen)[:60]
    params = SamplingParams(0.9)
    agreed = 0
    for seed in range(300):
        p = dataclasses.replace(params, seed=seed)
        final = sampling.sample_token(logits, p, 11)
        head, confidence, proposal = sampling.propose(logits[ids], ids, p, 11)
        assert proposal is None and 0 < confidence < 1 and head in ids.tolist()
        if final in ids.tolist():
            assert head == final
            agreed += 1
    assert agreed > 30  # the premise


# --- the runtime on a tiny model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def engines(model_dir):
    """Untrained heads at every inner layer (helpers.build_stages): mostly wrong, many rollbacks."""
    splits = {1: [(0, 6)], 2: [(0, 3), (3, 6)], 3: [(0, 2), (2, 4), (4, 6)]}
    return {n: make_engine(model_dir, r) for n, r in splits.items()}


PROMPT = [5, 17, 33, 2, 9, 41, 7]
TINY_MODEL_SEED = 5  # the weights of conftest.model_dir


def test_temperature_zero_is_the_greedy_path(engines):
    engine = engines[2]
    greedy = engine.generate(PROMPT, max_new_tokens=16, early_exit="eager")
    with mock.patch.object(sampling, "sample_token", side_effect=AssertionError), \
         mock.patch.object(sampling, "propose", side_effect=AssertionError):
        for kw in ({"temperature": 0.0}, {"sampling": SamplingParams(0.0, top_k=3, seed=9)}):
            res = engine.generate(PROMPT, max_new_tokens=16, early_exit="eager", **kw)
            assert res.tokens == greedy.tokens and res.stats["sampling"] is None


def test_seeded_tokens_depend_on_the_seed_alone(engines):
    """Off, eager and deferred on 1, 2 and 3 stages: the tokens of plain seeded sampling."""
    rollbacks, outputs = 0, set()
    for seed in range(3):
        params = SamplingParams(0.8, top_p=0.95, seed=seed)
        ref = engines[1].generate(PROMPT, max_new_tokens=20, sampling=params).tokens
        outputs.add(tuple(ref))
        for n, engine in engines.items():
            for mode in ("off", "eager", "deferred"):
                res = engine.generate(PROMPT, max_new_tokens=20, early_exit=mode, sampling=params)
                assert res.tokens == ref, (seed, n, mode)
                rollbacks += res.stats["rollbacks"]
    assert len(outputs) == 3 and rollbacks > 20  # the premises: it samples, and verification undid work


def test_speculative_is_deterministic_and_independent_of_the_stage_split(engines):
    """Eager, and deferred, whose merged chunks must carry their parked items' proposals (for
    deferred, equal tokens are also the CPU fp32 property of tests/test_early_exit.py)."""
    params = SamplingParams(1.0, seed=4, mode="speculative")
    ref = engines[1].generate(PROMPT, max_new_tokens=20, early_exit="eager", sampling=params)
    assert ref.stats["early_emitted"] > 5 and ref.stats["rollbacks"] > 0
    def merged() -> int:
        return sum(s.stats.merged for engine in engines.values() for s in engine.stages)

    before = merged()
    for n, engine in engines.items():
        for mode in ("eager", "deferred"):
            assert engine.generate(PROMPT, max_new_tokens=20, early_exit=mode, sampling=params).tokens == ref.tokens, n
    assert merged() > before  # the premise: deferred merged parked items (and their proposals)
    # Without proposals, speculative is plain seeded sampling.
    off = engines[2].generate(PROMPT, max_new_tokens=20, sampling=params).tokens
    seeded = dataclasses.replace(params, mode="seeded")
    assert off == engines[2].generate(PROMPT, max_new_tokens=20, sampling=seeded).tokens


def test_generate_refuses_bad_parameters(engines):
    engine = engines[1]
    with pytest.raises(ValueError, match="sampling parameter temperature = -1"):
        engine.generate(PROMPT, max_new_tokens=2, temperature=-1)
    with pytest.raises(ValueError, match="sampling parameter top_p = 0"):
        engine.generate(PROMPT, max_new_tokens=2, temperature=1, top_p=0)
    with pytest.raises(ValueError, match="not both"):
        engine.generate(PROMPT, max_new_tokens=2, sampling=SamplingParams(1.0), seed=3)


# --- speculative: the statistical test ---------------------------------------------------------

VOCAB = 12  # small, so that every token's frequency is tested
HEAD_VOCAB = [0, 1, 2, 3, 5, 6, 8, 9]  # a restricted head: q = 0 on 4, 7, 10, 11
DRAWS = 2500


class RecordingHeads(ExitHeads):
    """Real exit heads, keeping every proposal they make."""

    proposals: list

    def propose(self, layer, hidden, params, pos):
        out = super().propose(layer, hidden, params, pos)
        self.proposals.append(out[2])
        return out


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    """A 4-layer model with 12 tokens in two stages; an untrained head (T = identity) at the
    stage boundary (layer 2) with threshold 0, so that every first token is proposed on stage 0
    and accepted or resampled on stage 1; and p, the final layer's logits after the prompt."""
    path = save_tiny_model(tmp_path_factory.mktemp("vocab12"), vocab_size=VOCAB, num_hidden_layers=4, seed=1)
    config = load_hf_config(path)
    args = ModelArgs.from_hf_config(config)
    mods = [load_stage_modules(path, config, a, b, embed=a == 0, head=b == 4) for a, b in [(0, 2), (2, 4)]]
    vocab = torch.tensor(HEAD_VOCAB)
    heads = RecordingHeads({2: torch.eye(args.hidden_size)}, mods[1].norm,
                           mods[1].lm_head.weight[vocab].contiguous(), vocab, {2: 0.0}, {})
    stages = [Stage(i, 2, StageModel(m, args, 16), heads=heads) for i, m in enumerate(mods)]
    whole = StageModel(load_stage_modules(path, config, 0, 4, embed=True, head=True), args, 16)
    prompt = [3, 7, 1, 4]
    logits = whole.logits(whole.run_layers(whole.embed(prompt), 0, 0, 4, 0))[-1]
    return LocalRunner(stages), heads, prompt, logits, itertools.count()


@pytest.mark.parametrize(
    "params",
    [SamplingParams(1.0, mode="speculative"), SamplingParams(0.8, top_k=9, top_p=0.9, mode="speculative")],
    ids=["T1", "T0.8-k9-p0.9"],
)
def test_speculative_draws_follow_the_final_layers_distribution(small_vocab, params):
    runner, heads, prompt, logits, seq_ids = small_vocab  # sequence ids are never reused on a stage
    heads.proposals = []
    pos = len(prompt)
    tokens = []
    for seed in range(DRAWS):
        coord, seq = Coordinator(max_inflight=2), next(seq_ids)
        coord.add_sequence(seq, prompt, StopCriteria(1, frozenset()), early_exit="eager",
                           sampling=dataclasses.replace(params, seed=seed))
        runner.run(coord)
        tokens.append(coord.sequences[seq].generated[0])
    # The head proposes the first token (and, on the early token in flight, the second): keep the first's.
    heads.proposals = [prop for prop in heads.proposals if prop.pos == pos]
    assert len(heads.proposals) == DRAWS
    p = sampling.process_logits(logits, params).softmax(-1)
    q = torch.zeros(VOCAB)
    q[list(heads.proposals[0].ids)] = torch.tensor(heads.proposals[0].probs)
    assert 0.5 * float((p - q).abs().sum()) > 0.5  # the premise: the head is far from the final layer

    def counts(draws) -> torch.Tensor:
        return torch.bincount(torch.tensor(draws), minlength=VOCAB)

    assert chi_square_p_value(counts(tokens), p) > ALPHA
    rejected = sum(t != prop.token for t, prop in zip(tokens, heads.proposals))
    assert rejected > DRAWS // 4  # the residual was drawn from often
    assert chi_square_p_value(counts([prop.token for prop in heads.proposals]), q) > ALPHA  # proposals ~ q

    # The pipeline applied speculative_token: replaying it on the recorded proposals gives its tokens.
    def replay() -> list[int]:
        return [sampling.speculative_token(p, prop, seed, pos) for seed, prop in enumerate(heads.proposals)]

    assert replay() == tokens
    # The same test rejects wrong rules on the same proposals: keeping every proposal (the
    # head's q), and resampling from p itself rather than from max(0, p - q).
    assert chi_square_p_value(counts([prop.token for prop in heads.proposals]), p) < 1e-12
    with mock.patch.object(sampling, "residual", lambda p, proposal: p):
        assert chi_square_p_value(counts(replay()), p) < 1e-12


@pytest.mark.parametrize("kind", ["huge", "tiny-spread", "inf", "nan", "all-inf", "all-nan", "neg-inf"])
@pytest.mark.parametrize("mode", SAMPLING_MODES)
def test_the_sampler_cannot_fail_on_any_logits(kind, mode):
    """Finite logits of any size at the smallest temperature, and even inf/NaN from a broken model,
    give a valid token id: a rank never dies in the sampler."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1000, generator=gen)
    logits = {
        "huge": x * 3e38, "tiny-spread": x * 1e-30, "inf": x.index_fill(0, torch.tensor([7]), math.inf),
        "nan": x.index_fill(0, torch.tensor([3, 9]), math.nan), "all-inf": torch.full((1000,), math.inf),
        "all-nan": torch.full((1000,), math.nan), "neg-inf": torch.full((1000,), -math.inf),
    }[kind]
    for params in (SamplingParams(MIN_TEMPERATURE, mode=mode),
                   SamplingParams(MAX_TEMPERATURE, top_k=MAX_TOP_K, mode=mode),
                   SamplingParams(1.0, top_p=1e-9, min_p=1.0, seed=MAX_SEED, mode=mode)):
        token = sampling.sample_token(logits, params, pos=5)
        assert 0 <= token < 1000
        head_token, confidence, _ = sampling.propose(logits[:100], None, params, pos=5)
        assert 0 <= head_token < 100 and 0 <= confidence <= 1
    if kind == "inf":
        assert sampling.sample_token(logits, SamplingParams(1.0), pos=5) == 7
