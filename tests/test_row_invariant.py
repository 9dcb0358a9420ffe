"""Row invariance: every op a layer runs on a merged chunk gives each row the bits of its own call.

Plain decoding runs the prompt as one call and each later position alone; a ``deferred`` chunk and a
``fused`` batch run those rows together (runtime/row_invariant.py). These tests compare, bit for bit,
in fp32 and bf16, k rows through the runtime's row-invariant path against the same rows alone. The
elementwise ops and RMSNorm are ATen's own kernels called once on all rows: if a torch upgrade makes
one of them depend on the row count, its test here fails first.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from adadecode.runtime import exit_heads, row_invariant
from adadecode.runtime.exit_heads import head_logits
from adadecode.runtime.hf_adapter import (
    ModelArgs,
    _sdpa,
    apply_rope,
    causal_chunk_mask,
    load_hf_config,
    load_stage_modules,
    rms_norm,
)
from adadecode.runtime.model_runner import StageModel
from adadecode.runtime.work_queue import WorkItem
from helpers import save_tiny_model

DTYPES = [torch.float32, torch.bfloat16]
KS = [2, 3, 4, 8]


def _rows_alone(fn, x: torch.Tensor) -> torch.Tensor:
    """``fn`` on each row of ``x`` ([N, ...]) alone, concatenated."""
    return torch.cat([fn(x[i : i + 1]) for i in range(x.shape[0])])


@pytest.fixture(autouse=True)
def _inference():
    with torch.inference_mode():
        yield


# --- the parts of a chunk -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pos", "predict_from", "rows", "parts"),
    [
        (0, 4, 5, (5,)),  # a prompt
        (0, 4, 6, (5, 1)),  # a prompt parked by a head, joined by the first token
        (7, 7, 1, (1,)),  # a decode step
        (7, 7, 3, (1, 1, 1)),  # a backfill joined by the next token, which exited again
    ],
)
def test_a_chunks_parts_are_plain_decodings_calls(pos, predict_from, rows, parts):
    w = WorkItem(seq=0, epoch=0, pos=pos, layer=0, hidden=torch.zeros(rows, 2), predict_from=predict_from)
    assert w.parts == parts


def test_single_rows_share_a_call_up_to_what_the_kernel_allows_and_a_prompt_runs_alone():
    assert row_invariant.row_groups([5, 1, 1, 1], 2) == [(0, 5), (5, 7), (7, 8)]
    assert row_invariant.row_groups([1, 1, 1], 16) == [(0, 3)]
    assert row_invariant.row_groups([1, 1, 1], 1) == [(0, 1), (1, 2), (2, 3)]


# --- op by op -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 64), (192, 64), (64, 128), (96, 64), (64, 1536)])
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_gives_each_row_its_bits_alone(dtype, shape, fuse, bias):
    """q/k/v (fused), o, gate/up, down and the LM head of the tiny models, plus a K of 1536 (the
    bundled model's down projection, where bf16 rounds 2 rows unlike 1 on this CPU)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g).to(dtype)
    b = torch.randn(shape[0], generator=g).to(dtype) if bias else None
    x = torch.randn(8, shape[1], generator=g).to(dtype)
    alone = _rows_alone(lambda r: F.linear(r, w, b), x)
    for k in KS:
        assert torch.equal(row_invariant.linear(x[:k], w, b, (1,) * k, fuse), alone[:k])
        prompt = F.linear(x[:k], w, b)  # a prompt of k rows joined by one more row
        out = row_invariant.linear(x[: k + 1 if k < 8 else k], w, b, (k, 1) if k < 8 else (k,), fuse)
        assert torch.equal(out[:k], prompt)
        if k < 8:
            assert torch.equal(out[k], alone[k])


@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise_ops_and_rms_norm_are_row_invariant(dtype):
    """RMSNorm (a reduction within each row), RoPE, SiLU times up, the residual add and argmax:
    ATen's kernels called once on all rows, as the row-invariant path calls them."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 8, 64, generator=g).to(dtype)
    norm = torch.nn.Module()
    norm.weight = torch.nn.Parameter(torch.randn(64, generator=g).to(dtype), requires_grad=False)
    norm.variance_epsilon = 1e-5
    cos, sin = torch.randn(2, 1, 8, 1, 16, generator=g).to(dtype)
    q = torch.randn(1, 8, 4, 16, generator=g).to(dtype)
    gate, up = torch.randn(2, 1, 8, 128, generator=g).to(dtype)
    for k in KS:
        cases = {
            "rms_norm": (rms_norm(x[:, :k], norm), [rms_norm(x[:, i : i + 1], norm) for i in range(k)]),
            "rope": (
                apply_rope(q[:, :k], cos[:, :k], sin[:, :k]),
                [apply_rope(q[:, i : i + 1], cos[:, i : i + 1], sin[:, i : i + 1]) for i in range(k)],
            ),
            "silu_mul": (
                F.silu(gate[:, :k]) * up[:, :k],
                [F.silu(gate[:, i : i + 1]) * up[:, i : i + 1] for i in range(k)],
            ),
            "residual": (x[:, :k] + gate[:, :k, :64], [x[:, i : i + 1] + gate[:, i : i + 1, :64] for i in range(k)]),
            "argmax": (gate[0, :k].argmax(-1), [gate[0, i : i + 1].argmax(-1) for i in range(k)]),
        }
        for name, (together, alone) in cases.items():
            assert torch.equal(together, torch.cat(alone, dim=1 if together.dim() > 2 else 0)), (name, k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("input_pos", [0, 5, 40])
def test_attention_gives_each_row_its_bits_alone(dtype, input_pos):
    """k query rows at positions ``input_pos ..`` over the cache, against each row alone over its own
    prefix (no mask), as plain decoding calls SDPA; also a prompt of k rows joined by one more."""
    attn = torch.nn.Module()
    attn.num_key_value_groups, attn.is_causal, attn.scaling = 2, True, 0.25
    g = torch.Generator().manual_seed(2)
    n = input_pos + 9
    q = torch.randn(1, 4, 9, 16, generator=g).to(dtype)
    k_all, v_all = torch.randn(2, 1, 2, n, 16, generator=g).to(dtype)

    def sdpa(q, k, v, mask):
        return _sdpa(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling)[0].reshape(1, q.shape[2], -1)

    def mask_for(pos, rows):
        return causal_chunk_mask(pos, rows)

    alone = torch.cat(
        [
            sdpa(q[:, :, i : i + 1], k_all[:, :, : input_pos + i + 1], v_all[:, :, : input_pos + i + 1], None)
            for i in range(9)
        ],
        dim=1,
    )
    for k in KS:
        end = input_pos + k
        out = row_invariant.attention(sdpa, mask_for, q[:, :, :k], k_all[:, :, :end], v_all[:, :, :end], (1,) * k)
        assert torch.equal(out, alone[:, :k]), k
        prompt = sdpa(q[:, :, :k], k_all[:, :, :end], v_all[:, :, :end], mask_for(input_pos, k))
        out = row_invariant.attention(
            sdpa, mask_for, q[:, :, : k + 1], k_all[:, :, : end + 1], v_all[:, :, : end + 1], (k, 1)
        )
        assert torch.equal(out[:, :k], prompt) and torch.equal(out[:, k], alone[:, k]), k


@pytest.mark.parametrize("dtype", DTYPES)
def test_exit_heads_through_the_row_invariant_gemm(dtype, monkeypatch):
    """A head's transform and scores (``head_logits``) on k rows equal each row alone once their
    GEMMs go through ``row_invariant.linear`` (the runtime evaluates a head on one row only). The MLP
    hidden size is a multiple of 64: ATen's SiLU on a contiguous tensor runs one flat loop, so rows of
    16 fall partly in its vector body and partly in its scalar tail (scripts/row_invariance.py)."""
    g = torch.Generator().manual_seed(3)
    head = {
        k: torch.randn(s, generator=g).to(dtype)
        for k, s in (("T", (64, 64)), ("W1", (64, 64)), ("W2", (64, 64)), ("g", (64,)))
    }
    norm = torch.nn.Module()
    norm.weight = torch.nn.Parameter(torch.randn(64, generator=g).to(dtype), requires_grad=False)
    norm.variance_epsilon = 1e-5
    weight = torch.randn(96, 64, generator=g).to(dtype)
    x = torch.randn(8, 64, generator=g).to(dtype)
    alone = _rows_alone(lambda r: head_logits(head, r, norm, weight), x)
    for k in KS:

        def linear(a, w, b=None, k=k):
            return row_invariant.linear(a, w, b, (1,) * k)

        monkeypatch.setattr(exit_heads, "F", SimpleNamespace(linear=linear, silu=F.silu))
        assert torch.equal(head_logits(head, x[:k], norm, weight), alone[:k]), k
        monkeypatch.undo()


# --- whole layers, the LM head, fused batches ---------------------------------------------------


@pytest.fixture(scope="module", params=["llama", "qwen3_moe"])
def model_dir(request, tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp(request.param), request.param)


def _model(model_dir, dtype, mode: str, slots: int = 1) -> StageModel:
    config = load_hf_config(model_dir)
    modules = load_stage_modules(model_dir, config, 0, config.num_hidden_layers, embed=True, head=True, dtype=dtype)
    model = StageModel(modules, ModelArgs.from_hf_config(config), 32, num_slots=slots)
    model.row_invariant = mode
    return model


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["auto", "on"])
def test_a_merged_chunk_gives_plain_decodings_bits(model_dir, dtype, mode):
    """A prompt then single tokens, as plain decoding runs them, against the same rows as merged
    chunks (the prompt joined by the first token; two tokens; three), layer by layer and at the LM
    head."""
    model = _model(model_dir, dtype, mode)
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(12, model.args.hidden_size, generator=g).to(dtype)
    n = model.args.num_layers
    plain = [model.run_layers(hidden[:5], 0, 0, n)]
    plain += [model.run_layers(hidden[i : i + 1], i, 0, n) for i in range(5, 12)]
    plain_tokens = [t for h in plain for t in model.greedy_tokens(h[-1:])]
    model.reset(0)

    def upto(i: int, layer: int) -> torch.Tensor:  # position i alone, to a head at ``layer``
        return model.run_layers(hidden[i : i + 1], i, 0, layer)

    prompt = model.run_layers(hidden[:5], 0, 0, 2)
    merged = [model.run_layers(torch.cat([prompt, upto(5, 2)]), 0, 2, n, parts=(5, 1))]
    merged.append(model.run_layers(torch.cat([upto(6, 3), upto(7, 3)]), 6, 3, n, parts=(1, 1)))
    merged.append(model.run_layers(torch.cat([upto(8, 1), upto(9, 1), upto(10, 1)]), 8, 1, n, parts=(1, 1, 1)))
    merged.append(model.run_layers(hidden[11:12], 11, 0, n))
    out = torch.cat(merged)
    assert torch.equal(out, torch.cat(plain))
    assert model.greedy_tokens(out[4:]) == plain_tokens  # the LM head on the merged rows, as one call


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_batches_give_each_sequence_its_bits_alone(model_dir, dtype):
    """Three sequences (a prompt, two decode steps) through one fused call, against each alone."""
    model = _model(model_dir, dtype, "auto", slots=3)
    g = torch.Generator().manual_seed(5)
    d, layers = model.args.hidden_size, model.args.num_layers
    prompts = [torch.randn(n, d, generator=g).to(dtype) for n in (4, 3, 6)]
    steps = [torch.randn(1, d, generator=g).to(dtype) for _ in range(3)]
    alone = []
    for slot, (p, s) in enumerate(zip(prompts, steps)):
        model.run_layers(p, 0, 0, layers, slot)
        alone.append(model.run_layers(s, p.shape[0], 0, layers, slot))
    alone_tokens = (
        model.greedy_tokens(torch.cat(alone)[:1]) + model.greedy_tokens(alone[1]) + model.greedy_tokens(alone[2])
    )
    for slot in range(3):
        model.reset(slot)
    for slot, p in enumerate(prompts):
        model.run_layers(p, 0, 0, layers, slot)
    fused = model.run_layers_batch(
        [(s, p.shape[0], slot) for slot, (p, s) in enumerate(zip(prompts, steps))], 0, layers, exact=False
    )
    for a, f in zip(alone, fused):
        assert torch.equal(a, f)
    assert model.greedy_tokens(torch.cat(fused)) == alone_tokens
