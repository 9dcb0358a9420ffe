"""The one place that knows Hugging Face ``transformers``.

- ``ModelArgs``: the few numbers the runtime needs, read from an HF config.
- ``load_stage_modules``: builds transformers' own modules for a layer range on
  the meta device and reads from safetensors only the tensors of that range
  (plus embeddings / final norm / LM head where the stage needs them), so a
  rank never materialises the whole model (docs/design.md, invariant 5).
- ``decoder_layer_forward``: drives one of transformers' decoder-layer modules
  with our KV cache. It performs the same torch ops in the same order as the
  module's own ``forward`` (``tests/test_hf_adapter.py`` checks bit equality
  for every supported architecture) while skipping its per-call keyword and
  decorator overhead, which on this CPU costs about a third of a decode step.
  Attention itself goes through transformers' own SDPA function so that kernel
  choice (GQA packing, masks) is exactly theirs; a mixture-of-experts block is
  called as transformers' own module, so that routing is exactly theirs too.

The families (``SUPPORTED_MODEL_TYPES``) share one layer shape: RMSNorm, attention
with RoPE (q/k norms for Qwen3 and Gemma 3), RMSNorm, a gated MLP or a mixture of
experts, each with a residual. What differs is data: how q/k/v and gate/up are stored
(separate, or fused as in Phi-3), how much of a head is rotated (Phi-3's partial
rotary), and whether the MLP is dense or routed (Qwen3-MoE). Gemma 3 (``gemma3_text``)
adds four things, each marked on its modules at load time: norms after attention and
after the MLP too (``pre_feedforward_layernorm``), RMSNorm scaling by ``1 + w`` in
float32 (``rms_norm``), a RoPE base per attention kind (local and global layers:
``rope_tables`` puts the kinds' tables side by side, ``layer.rope_slice`` picks a
layer's), and local layers that attend to the last ``sliding_window`` positions only
(``layer.sliding_window``: the keys of that window, sliced from the cache's valid
prefix, with transformers' mask rule, ``sliding_window_keys``). Its embedding is scaled
by ``sqrt(hidden)`` (transformers' own module), and ``final_logit_softcapping``, where a
config sets it, caps the LM head's logits (``StageModules.softcap``, ``softcap``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import row_invariant
from .device import DTYPES  # noqa: F401  (re-exported: the dtype names the runtime accepts)
from .model_source import (
    SUPPORTED_MODEL_TYPES,
    ModelSourceError,
    UnsupportedArchitectureError,
)

try:  # transformers' own SDPA call, so kernel choice (GQA packing, masks) is exactly theirs
    from transformers.integrations.sdpa_attention import sdpa_attention_forward as _sdpa
except ImportError as e:  # pragma: no cover
    raise ImportError(f"adadecode needs transformers >= 5 with sdpa_attention ({e})") from e


@dataclass(frozen=True)
class ModelArgs:
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool

    @classmethod
    def from_hf_config(cls, config) -> ModelArgs:
        return cls(
            model_type=config.model_type,
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            vocab_size=config.vocab_size,
            max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )

    def layer_params(self, intermediate_size: int) -> int:
        return decoder_layer_params(self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim,
                                    intermediate_size)


def decoder_layer_params(hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int) -> int:
    """Weights of one Llama-style decoder layer: q, k, v, o and the gated MLP (norms aside)."""
    return hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * intermediate


def load_hf_config(model_dir: str | Path):
    """Read ``config.json`` as a transformers config, refusing unsupported architectures."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"model type `{config.model_type}` ({', '.join(config.architectures or [])}) is not supported; "
            f"adadecode runs decoder-only models of types {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if getattr(config, "use_bidirectional_attention", False):  # EmbeddingGemma: an encoder, not a decoder
        raise UnsupportedArchitectureError(
            f"model type `{config.model_type}` with use_bidirectional_attention (an embedding model) is not a "
            f"causal decoder; adadecode runs decoder-only models of types {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    config._attn_implementation = "sdpa"
    return config


def honours_sliding_window(config) -> bool:
    """Whether the runtime attends within the config's ``sliding_window`` on the layers that have
    one (Gemma 3's local layers); for the other families a cache longer than the window is refused."""
    return config.model_type == "gemma3_text"


@dataclass
class StageModules:
    """transformers modules of one stage; ``layers[i]`` is global layer ``start + i``."""

    start: int
    end: int
    layers: nn.ModuleList
    rotary: nn.Module
    embed: nn.Embedding | None = None
    norm: nn.Module | None = None
    lm_head: nn.Linear | None = None
    softcap: float | None = None  # final_logit_softcapping (Gemma): logits = cap * tanh(logits / cap)


def _weight_index(model_dir: Path) -> dict[str, str]:
    """tensor name -> safetensors file name."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return {name: "model.safetensors" for name in f.keys()}


def load_stage_modules(
    model_dir: str | Path,
    config,
    start: int,
    end: int,
    *,
    embed: bool,
    head: bool,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> StageModules:
    """Build the modules of layers ``[start, end)`` on ``device`` and read only their tensors.

    Each tensor goes from the file (memory-mapped) to ``device`` in ``dtype``, one at a time:
    the host holds at most one tensor beyond the file's pages, never a copy of the stage.
    """
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    base = skeleton.model
    wanted: dict[str, nn.Module] = {f"model.layers.{i}.": base.layers[i] for i in range(start, end)}
    if embed:
        wanted["model.embed_tokens."] = base.embed_tokens
    if head:
        wanted["model.norm."] = base.norm
        wanted["lm_head."] = skeleton.lm_head

    weight_map = _weight_index(model_dir)
    if head and "lm_head.weight" not in weight_map:
        weight_map["lm_head.weight"] = weight_map["model.embed_tokens.weight"]  # tied LM head
        tied = True
    else:
        tied = False

    device = torch.device(device)
    # file -> (source tensor, module, parameter, where in the parameter: () for the whole of it)
    by_file: dict[str, list[tuple[str, nn.Module, str, tuple]]] = {}
    stacked: dict[tuple[int, str], torch.Tensor] = {}  # parameters assembled from several tensors
    for prefix, module in wanted.items():
        for pname, param in module.named_parameters():
            full = prefix + pname
            src = "model.embed_tokens.weight" if tied and full == "lm_head.weight" else full
            pieces = [(src, ())] if full in weight_map else _expert_pieces(full, param.shape)
            for name, _ in pieces:
                if name not in weight_map:
                    raise ModelSourceError(
                        f"tensor `{name}` is missing from the weights in {model_dir}; the checkpoint does not "
                        f"match its config.json ({config.model_type}, {config.num_hidden_layers} layers)"
                    )
            if pieces[0][1] != ():
                stacked[(id(module), pname)] = torch.empty(param.shape, dtype=dtype, device=device)
                _set_param(module, pname, stacked[(id(module), pname)])
            for name, at in pieces:
                by_file.setdefault(weight_map[name], []).append((name, module, pname, at))
    shared: dict[str, torch.Tensor] = {}
    for fname, entries in by_file.items():
        with safe_open(str(model_dir / fname), framework="pt") as f:
            for src, module, pname, at in entries:
                if at != ():  # one expert's matrix into its rows of the stacked parameter
                    stacked[(id(module), pname)][at].copy_(f.get_tensor(src))
                    continue
                if src not in shared:  # one tensor at a time from the mmap, cast on its way
                    shared[src] = f.get_tensor(src).to(device=device, dtype=dtype)
                _set_param(module, pname, shared[src])
    for module in wanted.values():
        module.eval().requires_grad_(False)

    rotary = type(base.rotary_emb)(config=config).to(device)  # inv_freq from the CPU, as transformers does
    layers = nn.ModuleList(base.layers[i] for i in range(start, end))
    for i, layer in enumerate(layers):
        _fuse_projections(layer, config)
        _mark_attention_kind(layer, config, rotary, start + i)
    for module in wanted.values():
        _materialise_buffers(module, device)
    return StageModules(
        start=start,
        end=end,
        layers=layers,
        rotary=rotary,
        embed=base.embed_tokens if embed else None,
        norm=base.norm if head else None,
        lm_head=skeleton.lm_head if head else None,
        softcap=getattr(config, "final_logit_softcapping", None) if head else None,
    )


def _mark_attention_kind(layer: nn.Module, config, rotary: nn.Module, index: int) -> None:
    """``layer.sliding_window`` (the positions a local layer sees, None: all) and ``layer.rope_slice``
    (its rotation's columns in ``rope_tables``; None: the model has one rotation)."""
    kinds = getattr(rotary, "layer_types", None)  # Gemma 3: a RoPE base per attention kind
    layer.sliding_window = getattr(layer.self_attn, "sliding_window", None) if honours_sliding_window(config) else None
    layer.rope_slice = None
    if kinds:
        widths = [2 * getattr(rotary, f"{kind}_inv_freq").shape[0] for kind in kinds]
        at = kinds.index(config.layer_types[index])
        layer.rope_slice = slice(sum(widths[:at]), sum(widths[: at + 1]))


def _materialise_buffers(module: nn.Module, device: torch.device) -> None:
    """Buffers that transformers computes rather than loads are still on the meta device:
    Gemma 3's embedding scale (``sqrt(hidden)``, kept in float32 and cast to the weights' dtype
    in its forward, as transformers does). And Gemma's RMSNorm names its eps ``eps``: it gets
    the ``variance_epsilon`` the rest of the runtime reads (exit heads, head training)."""
    for sub in module.modules():
        if type(sub).__name__ == "Gemma3RMSNorm":
            sub.variance_epsilon = sub.eps
        if getattr(sub, "embed_scale", None) is not None and sub.embed_scale.is_meta:
            sub.embed_scale = torch.tensor(sub.scalar_embed_scale, device=device)


def _set_param(module: nn.Module, dotted: str, tensor: torch.Tensor) -> None:
    *path, leaf = dotted.split(".")
    for part in path:
        module = getattr(module, part)
    setattr(module, leaf, nn.Parameter(tensor, requires_grad=False))


def _expert_pieces(full: str, shape: torch.Size) -> list[tuple[str, tuple]]:
    """Where a mixture-of-experts parameter comes from when the checkpoint stores one matrix per
    expert (Qwen3-MoE as released, and as transformers saves it): ``(tensor, index into the
    parameter)`` per expert. transformers stacks them on load (its ``conversion_mapping``,
    ``qwen2_moe``): ``experts.gate_up_proj[e] = cat(gate_e, up_e)``, ``experts.down_proj[e] = down_e``.
    Anything else is returned as itself, for the caller to report missing."""
    prefix, _, leaf = full.rpartition(".")
    if not prefix.endswith(".experts") or leaf not in ("gate_up_proj", "down_proj"):
        return [(full, ())]
    if leaf == "down_proj":
        return [(f"{prefix}.{e}.down_proj.weight", (e,)) for e in range(shape[0])]
    rows = shape[1] // 2
    return [
        piece
        for e in range(shape[0])
        for piece in ((f"{prefix}.{e}.gate_proj.weight", (e, slice(0, rows))),
                      (f"{prefix}.{e}.up_proj.weight", (e, slice(rows, 2 * rows))))
    ]


def _fuse_projections(layer: nn.Module, config) -> None:
    """Store q/k/v and gate/up as one matrix each; the modules keep views into it.

    One [rows, D] matmul instead of three (or two) saves the per-call overhead;
    each output row is the same dot product, so results are bit-identical
    (checked in tests for 1..17 rows on the bundled model). Phi-3 stores them fused
    already (``qkv_proj``, ``gate_up_proj``): those are used as they are. A
    mixture-of-experts block keeps its own layout (``gate_up_weight`` is None).
    """
    attn, mlp = layer.self_attn, layer.mlp
    hd = attn.head_dim
    layer.qkv_split = (config.num_attention_heads * hd, config.num_key_value_heads * hd)  # rows of q, of k (= v)
    if hasattr(attn, "qkv_proj"):  # Phi-3
        layer.qkv_weight, layer.qkv_bias = attn.qkv_proj.weight, attn.qkv_proj.bias
    else:
        projs = [attn.q_proj, attn.k_proj, attn.v_proj]
        layer.qkv_weight = torch.cat([p.weight for p in projs])
        layer.qkv_bias = torch.cat([p.bias for p in projs]) if projs[0].bias is not None else None
        row = 0
        for p in projs:
            n = p.weight.shape[0]
            p.weight = nn.Parameter(layer.qkv_weight[row : row + n], requires_grad=False)
            if layer.qkv_bias is not None:
                p.bias = nn.Parameter(layer.qkv_bias[row : row + n], requires_grad=False)
            row += n
    layer.gate_up_weight = layer.gate_up_bias = None
    if isinstance(getattr(mlp, "gate_up_proj", None), nn.Linear):  # Phi-3: [gate; up], no bias
        layer.gate_up_weight, layer.gate_up_bias = mlp.gate_up_proj.weight, mlp.gate_up_proj.bias
    elif hasattr(mlp, "gate_proj"):
        layer.gate_up_weight = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        n = mlp.gate_proj.weight.shape[0]
        mlp.gate_proj.weight = nn.Parameter(layer.gate_up_weight[:n], requires_grad=False)
        mlp.up_proj.weight = nn.Parameter(layer.gate_up_weight[n:], requires_grad=False)
        if mlp.gate_proj.bias is not None:  # Llama's mlp_bias=True
            layer.gate_up_bias = torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias])
            mlp.gate_proj.bias = nn.Parameter(layer.gate_up_bias[:n], requires_grad=False)
            mlp.up_proj.bias = nn.Parameter(layer.gate_up_bias[n:], requires_grad=False)


def rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """transformers' LlamaRMSNorm (and Qwen's) op for op; Gemma's its own way (``gemma_rms_norm``)."""
    if type(norm).__name__ == "Gemma3RMSNorm":
        return gemma_rms_norm(x, norm)
    dtype = x.dtype
    h = x if dtype == torch.float32 else x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * (h if dtype == torch.float32 else h.to(dtype))


def gemma_rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """transformers' Gemma3RMSNorm op for op: in float32, scaled by ``1 + w``, then cast back
    (Llama casts before scaling by ``w``: transformers PR 29402)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)
    return (h * (1.0 + norm.weight.float())).type_as(x)


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``final_logit_softcapping`` as transformers applies it to the LM head's output (None: none)."""
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


def rope_tables(
    rotary: nn.Module, max_len: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and a sign-folded sin for every position, from transformers' rotary module.

    transformers computes ``q * cos + rotate_half(q) * sin`` with
    ``rotate_half(q) = cat(-q2, q1)``. Since ``(-a) * b == a * (-b)`` exactly in
    IEEE arithmetic, ``swap_halves(q) * cat(-sin1, sin2)`` gives the same bits
    with two fewer ops, and one call covers q and k together. The rotary math is
    elementwise per position, so table rows equal what it computes per call, on the same
    device (a GPU's sin/cos may differ from the CPU's in the last bit).

    A rotary module with a rotation per attention kind (Gemma 3's ``layer_types``) gives each
    kind's table side by side, in its ``layer_types`` order: a layer takes its own columns
    (``layer.rope_slice``), so that one slice per chunk serves every layer.

    # returns cos, sin_folded: [max_len, rotary_dim] (rotary_dim = head_dim but for partial rotary)
    """
    check_rope_length(getattr(rotary, "config", None), max_len)
    x, positions = torch.empty(1, dtype=dtype, device=device), torch.arange(max_len, device=device)[None]
    kinds = getattr(rotary, "layer_types", None)
    tables = [rotary(x, positions, kind) for kind in kinds] if kinds else [rotary(x, positions)]
    cos, sin = [], []
    for c, s in tables:
        half = s.shape[-1] // 2
        cos.append(c[0])
        sin.append(torch.cat((-s[0, :, :half], s[0, :, half:]), dim=-1))
    return (cos[0], sin[0]) if len(tables) == 1 else (torch.cat(cos, dim=-1), torch.cat(sin, dim=-1))


def sliding_window_keys(
    k_all: torch.Tensor, v_all: torch.Tensor, rows: int, window: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The keys and values a chunk's ``rows`` queries see in a local layer, and their mask: the
    last ``window`` positions up to each query (transformers' ``sliding_window_overlay``:
    ``q - k < window``), sliced from the valid prefix as transformers' sliding cache keeps them
    (``DynamicSlidingWindowLayer``: ``window - 1`` past positions). The mask is None exactly where
    transformers skips it for SDPA (``_ignore_causal_mask_sdpa``: one query or a chunk from
    position 0, over fewer than ``window`` keys), so each call is the one it makes.

    # k_all, v_all: [1, kv_heads, end, hd] (the valid prefix)
    #   -> k, v: [1, kv_heads, end - begin, hd]; mask: [1, 1, rows, end - begin] or None
    """
    end = k_all.shape[2]
    input_pos = end - rows
    begin = max(0, input_pos - window + 1)
    kv_len = end - begin
    if (rows == 1 or kv_len == rows) and kv_len < window:
        return k_all[:, :, begin:], v_all[:, :, begin:], None
    q = torch.arange(input_pos, end, device=k_all.device)[:, None]
    k = torch.arange(begin, end, device=k_all.device)[None, :]
    return k_all[:, :, begin:], v_all[:, :, begin:], ((k <= q) & (q - k < window))[None, None]


def check_rope_length(config, max_len: int) -> None:
    """Refuse tables longer than a ``longrope`` model's original context (Phi-3-mini-128k,
    Phi-3.5, Phi-4-mini). transformers rotates with the short factors while a call's positions
    stay within ``original_max_position_embeddings`` and with the long factors beyond it
    (``dynamic_rope_update``), so the rotation of a position depends on the call; one table
    row per position matches it only where the short factors always apply."""
    params = getattr(config, "rope_parameters", None) or {}
    original = params.get("original_max_position_embeddings")
    if params.get("rope_type") == "longrope" and original and max_len > original:
        raise ValueError(
            f"model.max_seq_len {max_len} exceeds {original}, the original context of this model's longrope "
            f"RoPE, beyond which transformers switches every position to the long factors; adadecode keeps one "
            f"rotation per position, so set model.max_seq_len <= {original}"
        )


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_folded: torch.Tensor) -> torch.Tensor:
    """RoPE on the first ``rotary_dim`` channels of each head, the rest passed through (Phi-3's
    partial rotary: transformers rotates ``x[..., :rotary_dim]`` and concatenates the rest).

    # x: [B, S, H, hd]; cos, sin_folded: [B, S, 1, rotary_dim]
    """
    b, s, h, hd = x.shape
    rd = cos.shape[-1]
    rot = x if rd == hd else x[..., :rd]
    swapped = rot.reshape(b, s, h, 2, rd // 2).flip(3).reshape(b, s, h, rd)
    out = (rot * cos) + (swapped * sin_folded)
    return out if rd == hd else torch.cat((out, x[..., rd:]), dim=-1)


def causal_chunk_mask(input_pos: int, length: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """Boolean mask for a chunk at ``input_pos`` over the valid prefix; ``None`` when SDPA's own
    causal flag is exact (a single query, or a chunk starting at position 0).

    # returns [1, 1, S, input_pos + S]
    """
    if length == 1 or input_pos == 0:
        return None
    q = torch.arange(input_pos, input_pos + length, device=device)[:, None]
    k = torch.arange(input_pos + length, device=device)[None, :]
    return (k <= q)[None, None]


def decoder_layer_forward(
    layer: nn.Module,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin_folded: torch.Tensor,
    kv_update,
    mask: torch.Tensor | None,
    split: Sequence[int] | None = None,
    fuse: bool = True,
    window_in_mask: bool = False,
) -> torch.Tensor:
    """One decoder layer of a supported family; ``kv_update(k, v) -> (k_all, v_all)`` writes the cache.
    ``split``, ``fuse``, ``window_in_mask``: as ``decoder_layer_forward_ragged``'s, for this one sequence.

    # hidden: [1, S, D]; cos, sin_folded: [1, S, 1, rotary_dim] (see ``rope_tables``)
    """
    splits = None if split is None else [split]
    return decoder_layer_forward_ragged(
        layer, hidden, cos, sin_folded, [(hidden.shape[1], kv_update, mask)], splits, fuse, window_in_mask
    )


def decoder_layer_forward_ragged(
    layer: nn.Module, hidden: torch.Tensor, cos, sin_folded, parts, splits=None, fuse: bool = True,
    window_in_mask: bool = False,
) -> torch.Tensor:
    """One decoder layer over the chunks of several sequences at once: ``parts`` is
    ``(rows, kv_update, mask)`` per sequence, in row order. The projections and the MLP run
    once over all rows; attention runs per sequence, each over its own cache. With one part
    this is op for op the layer's own forward. With several, a row's result may differ in the
    last bits from its result alone: GEMM kernels block and reduce differently by row count
    (measured in fp32 on this CPU; tests/test_serving.py), which is why serving batches
    ``exact`` by default (``StageModel.run_layers_batch``).

    ``splits``: per sequence, the row counts of the calls plain decoding makes for its rows
    (runtime/row_invariant.py): each row then gets the bits of its own call, the GEMMs shared by
    all rows only where ``fuse`` and the kernel allow, attention and a mixture of experts per part.

    ``window_in_mask``: the masks given already keep a local layer's queries within its window
    (``layer.sliding_window``), so its keys are not sliced to the window here.

    # hidden: [1, N, D] (N = sum of rows); cos, sin_folded: [1, N, 1, rotary_dim], each row its position's
    """
    attn, mlp = layer.self_attn, layer.mlp
    bsz, seqlen, _ = hidden.shape
    hd = attn.head_dim
    n_q, n_kv = layer.qkv_split
    rows_all = None if splits is None else [n for split in splits for n in split]
    linear: Callable[..., torch.Tensor] = (
        F.linear if rows_all is None else partial(row_invariant.linear, parts=rows_all, fuse=fuse)
    )

    if getattr(layer, "rope_slice", None) is not None:  # Gemma 3: this layer kind's rotation
        cos, sin_folded = cos[..., layer.rope_slice], sin_folded[..., layer.rope_slice]
    window = getattr(layer, "sliding_window", None)
    gemma = hasattr(layer, "pre_feedforward_layernorm")  # Gemma 3 also norms attention's and the MLP's outputs

    x = rms_norm(hidden, layer.input_layernorm)
    qkv = linear(x, layer.qkv_weight, layer.qkv_bias)
    v = qkv[..., n_q + n_kv :].view(bsz, seqlen, -1, hd).transpose(1, 2)
    if hasattr(attn, "q_norm"):  # Qwen3 and Gemma 3 normalise q and k per head before RoPE
        q = apply_rope(attn.q_norm(qkv[..., :n_q].view(bsz, seqlen, -1, hd)), cos, sin_folded)
        k = apply_rope(attn.k_norm(qkv[..., n_q : n_q + n_kv].view(bsz, seqlen, -1, hd)), cos, sin_folded)
    else:
        qk = apply_rope(qkv[..., : n_q + n_kv].view(bsz, seqlen, -1, hd), cos, sin_folded)
        q, k = qk[:, :, : n_q // hd], qk[:, :, n_q // hd :]
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    outs, row = [], 0

    def sdpa(q, k_all, v_all, mask):  # -> [B, S, H * hd]
        # a local layer: the window's keys, with its own mask (k_all: the valid prefix); unless the
        # caller's mask windows it already (the compiled step: static shapes, the whole buffer on CUDA)
        if window is not None and not window_in_mask:
            k_all, v_all, mask = sliding_window_keys(k_all, v_all, q.shape[2], window)
        return _sdpa(attn, q, k_all, v_all, mask, dropout=0.0, scaling=attn.scaling)[0].reshape(bsz, q.shape[2], -1)

    for i, (rows, kv_update, mask) in enumerate(parts):
        at = slice(row, row + rows)
        k_all, v_all = kv_update(k[:, :, at], v[:, :, at])
        if splits is not None and len(splits[i]) > 1:  # one call per part, each as plain decoding makes it
            mask_for = partial(causal_chunk_mask, device=hidden.device)
            outs.append(row_invariant.attention(sdpa, mask_for, q[:, :, at], k_all, v_all, splits[i]))
        else:
            outs.append(sdpa(q[:, :, at], k_all, v_all, mask))
        row += rows
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    o = linear(o, attn.o_proj.weight, attn.o_proj.bias)
    hidden = hidden + (rms_norm(o, layer.post_attention_layernorm) if gemma else o)

    x = rms_norm(hidden, layer.pre_feedforward_layernorm if gemma else layer.post_attention_layernorm)
    if layer.gate_up_weight is None:
        # a mixture of experts: transformers' own block, so that the router (softmax, top-k, its
        # normalisation) and the experts' kernel are exactly theirs; it works row by row
        return hidden + (mlp(x) if rows_all is None else row_invariant.by_part(mlp, x, rows_all))
    gate, up = linear(x, layer.gate_up_weight, layer.gate_up_bias).chunk(2, dim=-1)
    act = mlp.act_fn if hasattr(mlp, "act_fn") else mlp.activation_fn  # Phi-3's name for it
    out = linear(act(gate) * up, mlp.down_proj.weight, mlp.down_proj.bias)
    return hidden + (rms_norm(out, layer.post_feedforward_layernorm) if gemma else out)
