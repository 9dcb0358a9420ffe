"""Exit-head families: what an exit head at layer ``l`` computes before the frozen final norm and
LM head, ``logits = W_K final_norm(f(h_l))`` (``W_K``: the restricted vocabulary's LM-head rows).

- ``LinearHead``  the paper's ``f(h) = T h`` (``T`` identity at start).
- ``MLPHead``     ``f(h) = T h + W2 silu(W1 rmsnorm(h))`` with a small hidden size (``W2`` zero at
                  start, so it starts as the linear head).
                  These two are the runtime's head types (``train-heads --head-type``): their math
                  is ``exit_heads.head_transform``, and ``tensors()`` gives their parameters under
                  its names.
- ``AdapterHead`` one small decoder block over the exit layer's states, as Kangaroo's adapter:
                  ``x = h + Attn(rmsnorm(h))`` (causal self-attention with RoPE over this
                  sequence's exit-layer states, its own KV cache), ``f = x + MLP(rmsnorm(x))``
                  (gated SiLU), optionally followed by a linear ``T`` (identity at start). From
                  scratch, ``o`` and ``down`` start at zero, so the head starts as the identity
                  (``T`` may be a trained linear head's: a warm start). It may start as a copy
                  of the base model's decoder layer ``l``
                  (``from_layer``), so that at start it is the base model's own next layer.

Every family has ``forward(h, positions)`` over whole sequences (teacher-forced training:
``h`` [B, S, D], ``positions`` [S] or [B, S]; right padding is harmless because attention is
causal and padded rows are never scored), and ``state_dict`` tensors for storage. The adapter
also decodes incrementally with an explicit cache (``AdapterCache``: ``append`` a chunk of new
positions, ``truncate(length)`` to roll back exactly as the runtime's KV caches do), and
``step(h, cache)`` gives the same result as ``forward`` over the whole prefix.

A ``temperature`` buffer (1 at start, fitted after training by ``fit_temperature``) divides
the logits, so that the confidence (top softmax probability) is calibrated: see
``calibrated_confidence``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..exit_heads import head_transform

FAMILIES = ("linear", "mlp", "adapter")


def _rms(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y * weight if weight is not None else y


class ExitHead(nn.Module):
    """Base: ``transform`` (the family's f) then the frozen final norm and LM-head rows."""

    family = "base"

    def __init__(self):
        super().__init__()
        self.register_buffer("temperature", torch.ones(()))

    def transform(self, h: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, h, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor, positions=None,
               calibrated: bool = False) -> torch.Tensor:
        z = F.linear(_rms(self.transform(h, positions), norm_weight, eps), weight)
        return z / self.temperature if calibrated else z

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class LinearHead(ExitHead):
    family = "linear"
    eps = 0.0  # no norm of its own

    def __init__(self, d: int, init: torch.Tensor | None = None):
        super().__init__()
        self.T = nn.Parameter(init.clone().float() if init is not None else torch.eye(d))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The parameters under the names of runtime/exit_heads.py (``HEAD_TENSORS``)."""
        return {"T": self.T}

    def transform(self, h, positions=None):
        return head_transform(self.tensors(), h, self.eps)


class MLPHead(LinearHead):
    family = "mlp"

    def __init__(self, d: int, hidden: int = 256, eps: float = 1e-5, init: torch.Tensor | None = None,
                 generator: torch.Generator | None = None):
        super().__init__(d, init)
        self.eps = eps
        self.norm = nn.Parameter(torch.ones(d))  # g on disk; `norm` in the study's saved state dicts
        self.W1 = nn.Parameter(torch.randn(hidden, d, generator=generator) / math.sqrt(d))
        self.W2 = nn.Parameter(torch.zeros(d, hidden))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"T": self.T, "W1": self.W1, "W2": self.W2, "g": self.norm}


def rope(positions: torch.Tensor, head_dim: int, theta: float, dtype=torch.float32):
    """cos, sin [.., S, head_dim] for ``positions`` (the HF Llama convention: halves rotated)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    f = positions.float()[..., None] * inv
    emb = torch.cat([f, f], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class AdapterCache:
    """The adapter head's own KV cache for one sequence: ``k``, ``v`` [kv_heads, capacity, head_dim].
    Holds a contiguous prefix of positions (``length``); ``truncate`` rolls back by a length move."""

    def __init__(self, kv_heads: int, head_dim: int, capacity: int, dtype=torch.float32, device="cpu"):
        self.k = torch.zeros(kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[1]
        if self.length + n > self.k.shape[1]:
            grow = max(self.k.shape[1], n)
            self.k = torch.cat([self.k, torch.zeros_like(self.k[:, :grow])], 1)
            self.v = torch.cat([self.v, torch.zeros_like(self.v[:, :grow])], 1)
        self.k[:, self.length : self.length + n] = k
        self.v[:, self.length : self.length + n] = v
        self.length += n

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"truncate to {length}: the cache holds {self.length} positions")
        self.length = length


class AdapterHead(ExitHead):
    family = "adapter"

    def __init__(self, d: int, heads: int, kv_heads: int, head_dim: int, hidden: int, *, theta: float,
                 eps: float = 1e-5, linear: bool = False):
        super().__init__()
        # optional: the linear head's T on the block's output (identity at start)
        self.T = nn.Parameter(torch.eye(d)) if linear else None
        self.d, self.heads, self.kv_heads, self.head_dim = d, heads, kv_heads, head_dim
        self.theta, self.eps = theta, eps
        s = 1 / math.sqrt(d)
        self.attn_norm = nn.Parameter(torch.ones(d))
        self.q = nn.Parameter(torch.randn(heads * head_dim, d) * s)
        self.k = nn.Parameter(torch.randn(kv_heads * head_dim, d) * s)
        self.v = nn.Parameter(torch.randn(kv_heads * head_dim, d) * s)
        self.o = nn.Parameter(torch.zeros(d, heads * head_dim))
        self.mlp_norm = nn.Parameter(torch.ones(d))
        self.gate = nn.Parameter(torch.randn(hidden, d) * s)
        self.up = nn.Parameter(torch.randn(hidden, d) * s)
        self.down = nn.Parameter(torch.zeros(d, hidden))

    @classmethod
    def from_layer(cls, layer: nn.Module, config, hidden: int | None = None) -> AdapterHead:
        """A copy of a Llama-style decoder layer (``hidden`` < its MLP size keeps the first rows)."""
        hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rope_params = getattr(config, "rope_parameters", None) or {}
        theta = rope_params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        full = config.intermediate_size
        hidden = hidden or full
        a = cls(config.hidden_size, config.num_attention_heads, config.num_key_value_heads, hd, hidden,
                theta=theta, eps=config.rms_norm_eps)
        at, mlp = layer.self_attn, layer.mlp
        with torch.no_grad():
            a.attn_norm.copy_(layer.input_layernorm.weight)
            a.q.copy_(at.q_proj.weight), a.k.copy_(at.k_proj.weight), a.v.copy_(at.v_proj.weight)
            a.o.copy_(at.o_proj.weight)
            a.mlp_norm.copy_(layer.post_attention_layernorm.weight)
            a.gate.copy_(mlp.gate_proj.weight[:hidden]), a.up.copy_(mlp.up_proj.weight[:hidden])
            a.down.copy_(mlp.down_proj.weight[:, :hidden] * (full / hidden if hidden < full else 1.0))
        return a

    def _qkv(self, h, positions):
        # h: [B, S, D]; positions: [S] or [B, S]
        B, S, _ = h.shape
        x = _rms(h, self.attn_norm, self.eps)
        q = F.linear(x, self.q).view(B, S, self.heads, self.head_dim).transpose(1, 2)
        k = F.linear(x, self.k).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        v = F.linear(x, self.v).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope(positions, self.head_dim, self.theta, h.dtype)
        if cos.dim() == 2:
            cos, sin = cos[None, None], sin[None, None]
        else:
            cos, sin = cos[:, None], sin[:, None]
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def _out(self, h, attn):
        B, S, _ = h.shape
        x = h + F.linear(attn.transpose(1, 2).reshape(B, S, -1), self.o)
        y = _rms(x, self.mlp_norm, self.eps)
        x = x + F.linear(F.silu(F.linear(y, self.gate)) * F.linear(y, self.up), self.down)
        return F.linear(x, self.T) if self.T is not None else x

    def transform(self, h, positions=None):
        squeeze = h.dim() == 2
        if squeeze:
            h = h[None]
        if positions is None:
            positions = torch.arange(h.shape[1], device=h.device)
        q, k, v = self._qkv(h, positions)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out = self._out(h, attn)
        return out[0] if squeeze else out

    def new_cache(self, capacity: int = 256, device="cpu") -> AdapterCache:
        return AdapterCache(self.kv_heads, self.head_dim, capacity, self.q.dtype, device)

    def step(self, h: torch.Tensor, cache: AdapterCache) -> torch.Tensor:
        """``transform`` of the ``n`` new positions ``cache.length ..`` of one sequence, attending to
        the cached ones; appends their keys and values. # h: [n, D] -> [n, D]"""
        n = h.shape[0]
        start = cache.length
        positions = torch.arange(start, start + n, device=h.device)
        q, k, v = self._qkv(h[None], positions)
        cache.append(k[0], v[0])
        K, V = cache.k[None, :, : cache.length], cache.v[None, :, : cache.length]
        # causal within the chunk: new row i sees cached positions and new rows 0..i
        mask = torch.ones(n, cache.length, dtype=torch.bool, device=h.device).tril(start)
        attn = F.scaled_dot_product_attention(q, K, V, attn_mask=mask, enable_gqa=True)
        return self._out(h[None], attn)[0]


def make_head(family: str, base_model, layer: int, **kw) -> ExitHead:
    """A fresh head of ``family`` for exit layer ``layer`` of HF ``base_model`` (frozen)."""
    config = base_model.config
    d = config.hidden_size
    if family == "linear":
        return LinearHead(d, kw.get("init"))
    if family == "mlp":
        return MLPHead(d, kw.get("hidden") or 256, config.rms_norm_eps, kw.get("init"))
    if family == "adapter":
        if kw.get("from_layer", True):
            return AdapterHead.from_layer(base_model.model.layers[layer], config, kw.get("hidden"))
        hd = getattr(config, "head_dim", None) or d // config.num_attention_heads
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        head = AdapterHead(d, config.num_attention_heads, config.num_key_value_heads, hd, kw.get("hidden") or 512,
                           theta=theta, eps=config.rms_norm_eps, linear=kw.get("linear", True))
        if kw.get("init") is not None and head.T is not None:  # warm start: a trained linear head's T
            with torch.no_grad():
                head.T.copy_(kw["init"])
        return head
    raise ValueError(f"head family {family!r}: expected one of {FAMILIES}")


@torch.no_grad()
def fit_temperature(logits: torch.Tensor, agree: torch.Tensor) -> float:
    """The temperature that makes the top softmax probability a calibrated probability of agreeing
    with the final layer: minimises the binary cross-entropy of ``max softmax(logits / t)`` against
    ``agree`` (bool [N]) over a log grid, then a finer one around the best."""
    def bce(t):
        p = torch.softmax(logits / t, -1).max(-1).values.clamp(1e-6, 1 - 1e-6)
        return float(-(agree * p.log() + (~agree) * (1 - p).log()).mean())

    grid = torch.logspace(-1.5, 1.2, 55).tolist()
    best = min(grid, key=bce)
    fine = torch.linspace(best / 1.12, best * 1.12, 21).tolist()
    return min(fine, key=bce)


def load_family_heads(path, base_model) -> tuple[dict[int, ExitHead], torch.Tensor]:
    """Heads written by scripts/heads_study.py ``--save`` (``heads.safetensors``: ``vocab_ids`` and
    ``{family}.{layer}.{parameter}`` float32 tensors, ``temperature`` included; ``meta.json``:
    ``head_type``, layers). Returns ({layer: head}, vocab_ids)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    family = meta["head_type"]
    tensors = load_file(str(path / "heads.safetensors"))
    heads = {}
    for layer in meta["layers"]:
        sd = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"{family}.{layer}.")}
        kw = {}
        if family == "mlp":
            kw["hidden"] = sd["W1"].shape[0]
        if family == "adapter":
            kw = {"hidden": sd["gate"].shape[0], "from_layer": False, "linear": "T" in sd}
        head = make_head(family, base_model, layer, **kw)
        head.load_state_dict(sd)
        heads[layer] = head.eval().requires_grad_(False)
    return heads, tensors["vocab_ids"].long()
