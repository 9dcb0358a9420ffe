r"""Which of a layer's ops give a row the same bits alone (1 row) as inside k rows, on this machine.

For each op a decoder layer runs on a chunk (the GEMMs of q/k/v, o, gate/up, down and the LM head,
RMSNorm, RoPE, SiLU times up, attention over the cache, an exit head), in fp32 and bf16, eagerly
(ATen) and compiled (inductor; ``--compiled``, with frozen weights, ``--autotune`` adds its C++ GEMM
template, the only GEMM backend of the runtime's compiled stages), it compares k rows (k = 2, 3, 4,
8) against each row alone, bit for bit, and prints a table; ``row_invariant`` rows are the runtime's
own path (runtime/row_invariant.py). Shapes are the bundled model's (SmolLM2-135M: D 576, 9 heads
of 64, 3 KV heads, MLP 1536, vocabulary 49152) with random weights; nothing is downloaded.

    python scripts/row_invariance.py                       # eager, 1 thread
    python scripts/row_invariance.py --compiled --threads 1
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from adadecode.runtime import row_invariant
from adadecode.runtime.compiled_step import CPU_INDUCTOR
from adadecode.runtime.hf_adapter import _sdpa, apply_rope, causal_chunk_mask

KS = (2, 3, 4, 8)
D, HEADS, KV_HEADS, HD, INTER, VOCAB, CTX = 576, 9, 3, 64, 1536, 49152, 100


def ops(dtype: torch.dtype, g: torch.Generator, device: str = "cpu") -> dict:
    """name -> (fn over rows [N, ...] -> [N, ...], input [8, ...])."""

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    out = {}
    for name, (n, k) in {
        "qkv": ((HEADS + 2 * KV_HEADS) * HD, D),
        "o": (D, HEADS * HD),
        "gate_up": (2 * INTER, D),
        "down": (D, INTER),
        "lm_head": (VOCAB, D),
    }.items():
        # a parameter, as a layer's weight is: freezing folds only parameters into the graph as constants,
        # and the C++ GEMM template (--autotune) takes constant weights only (else it has no choice to offer)
        w = torch.nn.Parameter(rnd(n, k, scale=k**-0.5), requires_grad=False)
        out[name] = (lambda x, w=w: F.linear(x, w), rnd(8, k))
        out[name + " (row_invariant)"] = (lambda x, w=w: row_invariant.linear(x, w, None, (1,) * x.shape[0]), rnd(8, k))
    nw = rnd(D)

    def rms(x):
        h = x.float()
        return nw * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)

    out["rms_norm"] = (rms, rnd(8, D))
    cos, sin = rnd(CTX + 8, HD), rnd(CTX + 8, HD)

    def rope(x):  # every row at position CTX, so that a row's table row does not depend on k
        c, s = (t[CTX].expand(x.shape[0], HD)[None, :, None] for t in (cos, sin))
        return apply_rope(x[None].view(1, x.shape[0], HEADS, HD), c, s)[0].reshape(x.shape[0], -1)

    out["rope"] = (rope, rnd(8, HEADS * HD))
    out["silu_mul (strided, as in the layer)"] = (lambda x: F.silu(x[:, :INTER]) * x[:, INTER:], rnd(8, 2 * INTER))
    out["silu (contiguous rows of 16)"] = (F.silu, rnd(8, 16))
    attn = torch.nn.Module()
    attn.num_key_value_groups, attn.is_causal = HEADS // KV_HEADS, True
    k_all, v_all = rnd(1, KV_HEADS, CTX + 8, HD), rnd(1, KV_HEADS, CTX + 8, HD)

    def sdpa(q, k, v, mask):
        return _sdpa(attn, q, k, v, mask, dropout=0.0, scaling=HD**-0.5)[0].reshape(1, q.shape[2], -1)

    def mask_for(pos: int, n: int):
        return causal_chunk_mask(pos, n, device)

    def attention(x, pos0=CTX, invariant=False):  # x: [N, H * hd], queries at positions pos0 ..
        n = x.shape[0]
        q = x.view(1, n, HEADS, HD).transpose(1, 2)
        k, v = k_all[:, :, : pos0 + n], v_all[:, :, : pos0 + n]
        if invariant:
            return row_invariant.attention(sdpa, mask_for, q, k, v, (1,) * n)[0]
        return sdpa(q, k, v, mask_for(pos0, n))[0]

    out["attention (sdpa, chunk mask)"] = (attention, rnd(8, HEADS * HD))
    out["attention (row_invariant)"] = (lambda x, pos0=CTX: attention(x, pos0, True), rnd(8, HEADS * HD))
    t = torch.nn.Parameter(rnd(D, D, scale=D**-0.5), requires_grad=False)
    out["exit head T (linear head)"] = (lambda x: F.linear(x, t), rnd(8, D))
    return out


def alone_by_position(name, fn, x):
    """Each row alone; attention's row i at position CTX + i, over its own prefix (no mask)."""
    if name.startswith("attention"):
        return torch.cat([fn(x[i : i + 1], pos0=CTX + i) for i in range(x.shape[0])])
    return torch.cat([fn(x[i : i + 1]) for i in range(x.shape[0])])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compiled", action="store_true", help="also inductor, frozen weights (slow: one graph per k)")
    ap.add_argument("--autotune", action="store_true", help="compiled with max_autotune (the C++ GEMM template)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (compiled: CPU only)")
    ap.add_argument("--json-out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        for name, (fn, x) in ops(dtype, g, args.device).items():
            modes = [("eager", fn)]
            if args.compiled and "row_invariant" not in name and args.device == "cpu":
                torch._dynamo.reset()  # every op its own graphs (the lambdas share one code object)
                torch._dynamo.config.recompile_limit = 64  # one graph per k (and per position: attention)
                modes.append(("compiled", torch.compile(fn, dynamic=False)))
            for mode, f in modes:
                cfg = CPU_INDUCTOR if args.autotune else {"freezing": True}  # the runtime's compiled stages
                with torch.inference_mode(), torch._inductor.config.patch(cfg):
                    alone = alone_by_position(name, f, x)
                    same = {k: bool(torch.equal(f(x[:k]), alone[:k])) for k in KS}
                row = {
                    "op": name,
                    "dtype": str(dtype).removeprefix("torch."),
                    "mode": mode,
                    **{f"k={k}": v for k, v in same.items()},
                }
                results.append(row)
                print(
                    f"{row['op']:40s} {row['dtype']:9s} {mode:9s} "
                    + " ".join(f"k={k}:{'same' if v else 'DIFF'}" for k, v in same.items()),
                    flush=True,
                )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
