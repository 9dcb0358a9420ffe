"""Issue 18 part 1: head families and training recipes, measured on the heads' validation split.

Steps (each caches its output under --work, default /tmp/heads-study; rerun any step alone):

  # greedy answers to the train prompts (train + validation split, 948 s + 131 s on one busy thread),
  # then their teacher-forced states at the pipeline's head layers (on-policy data)
  python scripts/heads_study.py --threads 1 prepare
  # teacher-forced states of local text (Python stdlib, /usr/share/doc), in shards of ~7.5k tokens
  python scripts/heads_study.py --threads 1 text --tokens 200000
  # today's bundled heads, evaluated by the same code
  python scripts/heads_study.py --threads 1 run --baseline --family none --out /tmp/heads-study/res_baseline.json
  # a family (linear, mlp, adapter) on the on-policy data plus N text tokens, for each N
  python scripts/heads_study.py --threads 1 run --family linear,mlp --train-tokens 0,150000 --epochs 2
  python scripts/heads_study.py --threads 1 run --family adapter --hidden 512 --layers 4,7,10,13,16 \
      --train-tokens 50000 --epochs 1 --seq-tokens 512 --init-from /tmp/heads-study/heads_0/linear \
      --out /tmp/heads-study/adapter.json --save /tmp/heads-study/heads_adapter
  # does a head gain from the previous position's final state (T h + U final[t-1])? top-1..4 too
  python scripts/heads_study.py --threads 2 context --layers 16,19,22,25 --epochs 10 --project
  # cost per evaluation of each family against one decoder layer; markdown tables of result files
  python scripts/heads_study.py --threads 1 cost
  python scripts/heads_study.py report /tmp/heads-study/*.json

The validation split is the existing pipeline's (every 10th train prompt, never trained on): the
model's own greedy answers, answer positions only. The calibration split (temperatures, and
thresholds carried over to validation) is every 10th remaining train prompt from the 5th, never
trained on. Every family is evaluated by the same code (``evaluate``). exit@p>=X is the largest
exit rate whose exits (the most confident tokens) have precision >= X on the validation split
(the threshold fitted there, as the issue's 3.7% was); ``calsplit_thr@pX`` applies the threshold
fitted on the calibration split instead.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from adadecode.runtime.head_training import families
from adadecode.runtime.head_training.teacher_forced import (
    SeqStates,
    greedy_answers,
    local_text_chunks,
    split_prompts,
    teacher_forced,
)

LAYERS = [4, 7, 10, 13, 16, 19, 22, 25, 28]
MODEL = "bundled:smollm2-135m-instruct"


def log(msg):
    print(f"[heads-study {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_model():
    from adadecode.runtime.model_source import resolve_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_model(MODEL)
    tok = AutoTokenizer.from_pretrained(str(resolved.path))
    base = AutoModelForCausalLM.from_pretrained(str(resolved.path), dtype=torch.float32).eval()
    base.requires_grad_(False)
    return base, tok, resolved


def cmd_prepare(args):
    from adadecode.runtime.head_training.collect import encode, eos_ids
    from adadecode.runtime.prompts import read_prompts

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base, tok, _ = load_model()
    groups = split_prompts(read_prompts(args.prompts), args.val_every)
    greedy_file = work / "greedy.json"
    if greedy_file.exists():
        greedy = json.loads(greedy_file.read_text())
    else:
        eos = eos_ids(base, tok)
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
        greedy = {}
        for name, ps in groups.items():
            ids = [encode(tok, p) for p in ps]
            t = time.perf_counter()
            answers = greedy_answers(base, ids, max_new_tokens=256, batch_size=48, eos=eos, pad=pad)
            greedy[name] = [{"prompt": i, "answer": a} for i, a in zip(ids, answers)]
            log(f"greedy {name}: {len(ids)} prompts, {sum(map(len, answers))} tokens, {time.perf_counter() - t:.0f}s")
        greedy_file.write_text(json.dumps(greedy))
    for name, items in greedy.items():
        t = time.perf_counter()
        seqs = [it["prompt"] + it["answer"] for it in items]
        layers = [int(x) for x in args.layers.split(",")] if args.layers else LAYERS
        st = teacher_forced(base, seqs, layers, score_from=[len(it["prompt"]) - 1 for it in items])
        st.save(str(work / f"onpolicy_{name}{args.suffix}.pt"))
        agree = None
        # the teacher-forced argmax against the decoded greedy tokens, on the answer positions
        dec = torch.cat([torch.tensor(it["answer"][: len(it["answer"])]) for it in items])
        agree = float((st.targets[st.scored] == dec[: st.tokens_scored]).float().mean()) \
            if st.tokens_scored == len(dec) else None
        log(f"teacher-forced {name}: {st.num_sequences} seqs, {len(st.targets)} positions, "
            f"{st.tokens_scored} scored; argmax = greedy token on {agree}; {time.perf_counter() - t:.0f}s")


def cmd_text(args):
    """Teacher-forced states of local text, in shards of --shard chunks (text_NNN.pt; existing
    shards are kept, so an interrupted run resumes and a partial one is usable)."""
    work = Path(args.work)
    base, tok, _ = load_model()
    chunks = local_text_chunks(tok, args.tokens, chunk=args.chunk, seed=args.seed)
    log(f"text: {len(chunks)} chunks, {sum(map(len, chunks))} tokens")
    for i, a in enumerate(range(0, len(chunks), args.shard)):
        f = work / f"text_{i:03d}.pt"
        if f.exists():
            continue
        t = time.perf_counter()
        st = teacher_forced(base, chunks[a : a + args.shard], LAYERS)
        st.save(str(f))
        log(f"teacher-forced text shard {i}: {len(st.targets)} positions in {time.perf_counter() - t:.0f}s "
            f"({len(st.targets) / (time.perf_counter() - t):.0f} tok/s, {torch.get_num_threads()} threads)")


def load_text(work: Path, max_tokens: int) -> SeqStates | None:
    parts, n = [], 0
    for f in sorted(work.glob("text_[0-9][0-9][0-9].pt")):
        if n >= max_tokens:
            break
        parts.append(SeqStates.load(str(f)))
        n += len(parts[-1].targets)
    return SeqStates.concat(parts) if parts else None


def cmd_report(args):
    """A markdown table of every run in the result files ``args.files``."""
    for f in args.files:
        r = json.loads(Path(f).read_text())
        print(f"\n{f}: validation {r['validation_tokens']} tokens; one layer {r['layer_ms']} ms, "
              f"decode step {r['decode_step_ms']} ms ({r['threads']} thread)")
        for run in r["runs"]:
            print(f"\n**{run['family']}** ({run['desc']}): {run['train_positions']} train positions, "
                  f"{run['train_seconds']} s training, {run['params_per_head']} params/head, "
                  f"{run['eval_ms']} ms/eval = {run['eval_frac_layer']} layer\n")
            print("| layer | top-1 | exit@p>=0.9 | exit@p>=0.8 | T | γ=0.9 raw: exit/prec | γ=0.9 calibrated "
                  "| ECE raw/cal |")
            print("|---|---|---|---|---|---|---|---|")
            for l, m in run["layers"].items():
                raw, cal = m["raw@0.9"], m["cal@0.9"]
                print(f"| {l} | {m['top1']:.3f} | {m['exit@p0.9']:.3f} | {m['exit@p0.8']:.3f} | {m['temperature']} | "
                      f"{raw['exit_rate']:.3f}/{raw['precision']} | {cal['exit_rate']:.3f}/{cal['precision']} | "
                      f"{m['raw_ece']}/{m['cal_ece']} |")


def cmd_cost(args):
    """ms per head evaluation (one position, 1024-row head; the adapter with 200 cached positions)
    for each family, against one decoder layer of a decode step, in one process, median of 5."""
    import statistics

    base, _, _ = load_model()
    W = base.lm_head.weight[:1024].contiguous()
    res = {}
    layer = statistics.median(time_layer(base, reps=30)[0] for _ in range(5))
    res["layer_ms"] = round(layer, 4)
    for fam, kw in (("linear", {}), ("mlp", {"hidden": 256}), ("mlp", {"hidden": 1024}),
                    ("adapter", {"hidden": 512, "from_layer": False}), ("adapter", {"from_layer": True})):
        head = families.make_head(fam, base, 16, **kw)
        ms = statistics.median(time_eval(head, fam, base.config.hidden_size, W, base, reps=200) for _ in range(5))
        name = f"{fam}(hidden={kw.get('hidden', 'layer copy' if fam == 'adapter' else '')})"
        res[name] = {"ms": round(ms, 4), "fraction_of_layer": round(ms / layer, 3), "params": head.num_params()}
        log(f"{name}: {ms:.3f} ms = {ms / layer:.2f} layer, {head.num_params()} params")
    log(f"one layer {layer:.3f} ms ({torch.get_num_threads()} threads)")
    Path(args.work, "cost.json").write_text(json.dumps(res, indent=1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/heads-study")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("cost")
    q = sub.add_parser("report")
    q.add_argument("files", nargs="+")
    q = sub.add_parser("prepare")
    q.add_argument("--prompts", default="data/prompts/train.jsonl")
    q.add_argument("--val-every", type=int, default=10)
    q.add_argument("--layers", default=None, help="head layers to keep states of (default: the pipeline's)")
    q.add_argument("--suffix", default="", help="suffix of the state files (onpolicy_train{suffix}.pt)")
    q = sub.add_parser("text")
    q.add_argument("--tokens", type=int, default=150000)
    q.add_argument("--chunk", type=int, default=512)
    q.add_argument("--shard", type=int, default=16, help="chunks per saved shard")
    q = sub.add_parser("run")
    q.add_argument("--family", default="linear,mlp,adapter")
    q.add_argument("--layers", default=",".join(map(str, LAYERS)))
    q.add_argument("--train-tokens", default="0", help="comma list: how many text tokens to add to the on-policy "
                   "train data (0: on-policy only)")
    q.add_argument("--epochs", type=int, default=2)
    q.add_argument("--out", default=None)
    q.add_argument("--save", default=None, help="save the trained heads of each family here (DIR/FAMILY/)")
    q.add_argument("--lr", type=float, default=1e-3)
    q.add_argument("--batch-tokens", type=int, default=256, help="positions per step (linear, mlp)")
    q.add_argument("--seq-tokens", type=int, default=2048, help="padded positions per step (adapter)")
    q.add_argument("--hidden", type=int, default=None, help="MLP hidden size (mlp: 256; adapter: the layer's)")
    q.add_argument("--init-from", default=None, help="warm-start T from these linear heads (a --save DIR/linear)")
    q.add_argument("--suffix", default="", help="suffix of the on-policy state files (see prepare --suffix)")
    q.add_argument("--t-lr-scale", type=float, default=0.1, help="learning rate of a warm-started T, relative")
    q.add_argument("--baseline", action="store_true", help="also evaluate today's bundled linear heads")
    q.add_argument("--append", action="store_true", help="append to --out instead of starting it anew")
    q = sub.add_parser("context")
    q.add_argument("--layers", default="16,19")
    q.add_argument("--epochs", type=int, default=10)
    q.add_argument("--lr", type=float, default=1e-3)
    q.add_argument("--batch-tokens", type=int, default=256)
    q.add_argument("--project", action="store_true", help="then the head choice's speedups, top-1 and top-2")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    {"prepare": cmd_prepare, "text": cmd_text, "run": cmd_run, "report": cmd_report, "cost": cmd_cost,
     "context": cmd_context}[args.cmd](args)


def cmd_context(args):
    """Linear heads ``T h`` against ``T h + U p``, where ``p`` is the previous position's final
    (normed) state, which the last stage of a pipeline holds when the next position reaches a head
    on it (U starts at zero, so the second starts as the first); both on the on-policy data, the
    same steps, validated on the answer positions: top-1..4 agreement, exit at precision."""
    from adadecode.runtime.exit_heads import bundled_heads_path

    work = Path(args.work)
    base, _, _ = load_model()
    vocab_ids = heads_file_tensors(bundled_heads_path())["vocab_ids"].long()
    W = base.lm_head.weight[vocab_ids].contiguous()
    norm_w, eps = base.model.norm.weight, base.config.rms_norm_eps
    train = SeqStates.load(str(work / "onpolicy_train.pt"))
    val = SeqStates.load(str(work / "onpolicy_validation.pt"))

    def previous(data):  # zeros at a sequence's first position
        p = torch.zeros_like(data.final, dtype=torch.float32)
        p[1:] = data.final[:-1].float()
        p[data.offsets[:-1]] = 0
        return p

    def logits(T, U, h, p):
        x = h @ T.T + (p @ U.T if U is not None else 0)
        return F.linear(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_w, W)

    p_train, p_val = previous(train), previous(val)
    outcomes: dict[int, dict] = {}
    with torch.no_grad():
        teacher = F.log_softmax(F.linear(train.final.float(), W), -1)
    d, n = W.shape[1], len(train.targets)
    total = args.epochs * math.ceil(n / args.batch_tokens)
    for layer in (int(x) for x in args.layers.split(",")):
        h_train, h_val = train.hidden[layer].float(), val.hidden[layer].float()
        for with_context in (False, True):
            torch.manual_seed(args.seed)
            T = torch.nn.Parameter(torch.eye(d))
            U = torch.nn.Parameter(torch.zeros(d, d)) if with_context else None
            params = [T] + ([U] if U is not None else [])
            opt = torch.optim.Adam(params, lr=args.lr)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
            gen, t0 = torch.Generator().manual_seed(args.seed), time.perf_counter()
            for _ in range(args.epochs):
                for bt in batches_tokens(n, args.batch_tokens, gen):
                    z = logits(T, U, h_train[bt], p_train[bt])
                    loss = F.kl_div(F.log_softmax(z, -1), teacher[bt], log_target=True, reduction="batchmean")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
            with torch.no_grad():
                z = logits(T, U, h_val[val.scored], p_val[val.scored])
                target = val.targets[val.scored]
                probs, ids = torch.softmax(z, -1).topk(4, -1)
                top = vocab_ids[ids]
                agree = top[:, 0] == target
                row = {f"top{k}": round(float((top[:, :k] == target[:, None]).any(-1).float().mean()), 4)
                       for k in (1, 2, 3, 4)}
                row.update({f"exit@p{p}": round(exit_at_precision(probs[:, 0], agree, p)[0], 4) for p in (0.9, 0.8)})
            if not with_context:  # per validation token, in order: for --project
                outcomes[layer] = {"top1": (probs[:, 0], agree),
                                   "top2": (probs[:, :2].sum(-1), (top[:, :2] == target[:, None]).any(-1))}
            log(f"layer {layer} {'T h + U final[t-1]' if with_context else 'T h'}: {row} "
                f"({time.perf_counter() - t0:.0f} s)")
    if args.project:
        project_branching(outcomes)


def project_branching(outcomes):
    """The head choice's best simulated speedup (eager) with the ``T h`` heads' outcomes replayed in
    order, top-1 as the runtime runs them, and top-2: a token counts as right when the final one is
    among the head's two best, the exit gated on their summed probability, the second row free.
    Layers map to the target model by relative depth. A projection, and a bound on branching."""
    from adadecode.runtime.sim.costs import LLAMA_8B, LLAMA_70B, SMOLLM2_135M
    from adadecode.runtime.sim.heads import _choose

    def best(shape, ranges, device, element_size, per_row_merges, kind):
        to = {l: round(l * shape.layers / SMOLLM2_135M.layers) for l in outcomes}
        rows = tuple((to[l], ((0.5, 0.5, 0.5),)) for l in sorted(outcomes))  # only the layers count
        exact = tuple((to[l], tuple(outcomes[l][kind][0].tolist()), tuple(outcomes[l][kind][1].tolist()))
                      for l in sorted(outcomes))
        return _choose(shape, tuple(ranges), "eager", device, element_size, 0, rows, exact, False, 0, False,
                       per_row_merges).speedup

    def even(layers, stages):
        cuts = [round(i * layers / stages) for i in range(stages + 1)]
        return list(zip(cuts, cuts[1:]))

    settings = [("this CPU, SmolLM2-135M, 2 ranks", SMOLLM2_135M, [(0, 19), (19, 30)], "cpu", 4, True)]
    settings += [(f"H100, {shape.name}, P={p}", shape, even(shape.layers, p), "cuda", 2, False)
                 for shape in (LLAMA_8B, LLAMA_70B) for p in (2, 4, 8)]
    for name, shape, ranges, device, size, per_row in settings:
        log(f"{name}: top-1 {best(shape, ranges, device, size, per_row, 'top1')}x, "
            f"top-2 bound {best(shape, ranges, device, size, per_row, 'top2')}x")

# ---------------------------------------------------------------------------------------------
# training and evaluation


def heads_file_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "heads.safetensors"))


def batches_tokens(n, batch, gen):
    perm = torch.randperm(n, generator=gen)
    return [perm[a : a + batch] for a in range(0, n, batch)]


def batches_seqs(data: SeqStates, max_tokens, gen):
    """Groups of whole sequences (similar lengths together), about ``max_tokens`` padded positions each."""
    lens = (data.offsets[1:] - data.offsets[:-1]).tolist()
    order = sorted(range(len(lens)), key=lambda s: (lens[s], s))
    groups, cur, width = [], [], 0
    for s in order:
        w = max(width, lens[s])
        if cur and w * (len(cur) + 1) > max_tokens:
            groups.append(cur)
            cur, w = [], lens[s]
        cur.append(s)
        width = w
    if cur:
        groups.append(cur)
    perm = torch.randperm(len(groups), generator=gen).tolist()
    return [groups[i] for i in perm]


def padded(data: SeqStates, seqs, layer):
    """[B, S, D] float32 states of layer ``layer`` for ``seqs`` (right padding), [B, S] valid mask,
    [B, S, D] final states."""
    lens = [int(data.offsets[s + 1] - data.offsets[s]) for s in seqs]
    S = max(lens)
    D = data.final.shape[1]
    h = torch.zeros(len(seqs), S, D)
    f = torch.zeros(len(seqs), S, D)
    m = torch.zeros(len(seqs), S, dtype=torch.bool)
    for b, s in enumerate(seqs):
        a, e = int(data.offsets[s]), int(data.offsets[s + 1])
        if layer is not None:
            h[b, : e - a] = data.hidden[layer][a:e].float()
        f[b, : e - a] = data.final[a:e].float()
        m[b, : e - a] = True
    return h, m, f


def train_family(family, layers, data: SeqStates, base, W, *, epochs, lr, seed, batch_tokens=512,
                 seq_tokens=4096, hidden=None, log_every=25, init_from=None, t_lr_scale=0.1):
    """Heads of ``family`` at ``layers``, fitted on KL(final || head) over ``W``'s rows on every
    position of ``data``. Returns {layer: head}, seconds."""
    norm_w, eps = base.model.norm.weight, base.config.rms_norm_eps
    family, _, variant = family.partition(":")
    kw = {"from_layer": True, "linear": False} if variant == "copy" else {"from_layer": False, "linear": True}
    inits = {}
    if init_from:  # warm start from trained linear heads (their T), saved by --save
        t = heads_file_tensors(init_from)
        inits = {l: t[f"linear.{l}.T"] for l in layers}
    heads = {l: families.make_head(family, base, l, hidden=hidden, init=inits.get(l), **kw) for l in layers}
    # a warm-started T (already trained) moves at t_lr_scale x the rate of the new parameters
    warm_T = [h.T for h in heads.values() if inits and getattr(h, "T", None) is not None]
    rest = [p for h in heads.values() for p in h.parameters() if all(p is not t for t in warm_T)]
    groups = [{"params": rest, "lr": lr}] + ([{"params": warm_T, "lr": lr * t_lr_scale}] if warm_T else [])
    opt = torch.optim.Adam(groups, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    per_epoch = (batches_seqs(data, seq_tokens, torch.Generator().manual_seed(seed)) if family == "adapter"
                 else batches_tokens(len(data.targets), batch_tokens, torch.Generator().manual_seed(seed)))
    total = epochs * len(per_epoch)
    warm = max(1, int(0.05 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm
        else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    t0 = time.perf_counter()
    step = 0
    for _ in range(epochs):
        batches = (batches_seqs(data, seq_tokens, gen) if family == "adapter"
                   else batches_tokens(len(data.targets), batch_tokens, gen))
        run = {l: 0.0 for l in layers}
        for bt in batches:
            loss = 0.0
            if family == "adapter":
                _, mask, fin = padded(data, bt, None)
                with torch.no_grad():
                    teacher = F.log_softmax(F.linear(fin[mask], W), -1)
                pos = torch.arange(mask.shape[1])
                for l in layers:
                    h, _, _ = padded(data, bt, l)
                    z = heads[l].logits(h, norm_w, eps, W, positions=pos)[mask]
                    kl = F.kl_div(F.log_softmax(z, -1), teacher, log_target=True, reduction="batchmean")
                    run[l] += float(kl)
                    loss = loss + kl
            else:
                with torch.no_grad():
                    teacher = F.log_softmax(F.linear(data.final[bt].float(), W), -1)
                for l in layers:
                    z = heads[l].logits(data.hidden[l][bt].float(), norm_w, eps, W)
                    kl = F.kl_div(F.log_softmax(z, -1), teacher, log_target=True, reduction="batchmean")
                    run[l] += float(kl)
                    loss = loss + kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % log_every == 0:
                seen = 1 + (step - 1) % len(batches)
                log(f"  {family} step {step}/{total} kl " + " ".join(f"{l}:{run[l] / seen:.3f}" for l in layers))
    return heads, time.perf_counter() - t0


@torch.no_grad()
def head_outputs(head, layer, data: SeqStates, base, W, family):
    """(logits [N_scored, K]) of ``head`` on the scored positions of ``data``."""
    norm_w, eps = base.model.norm.weight, base.config.rms_norm_eps
    if family == "adapter":
        out = []
        for s in range(data.num_sequences):
            a, e = int(data.offsets[s]), int(data.offsets[s + 1])
            z = head.logits(data.hidden[layer][a:e].float()[None], norm_w, eps, W, positions=torch.arange(e - a))[0]
            out.append(z[data.scored[a:e]])
        return torch.cat(out)
    return head.logits(data.hidden[layer][data.scored].float(), norm_w, eps, W)


def exit_at_precision(conf, agree, p):
    """The largest exit rate whose exits (the most confident tokens) have precision >= p, and the threshold."""
    order = torch.argsort(conf, descending=True)
    c = agree[order].float().cumsum(0) / torch.arange(1, len(conf) + 1)
    ok = torch.nonzero(c >= p).flatten()
    if not len(ok):
        return 0.0, None
    k = int(ok[-1]) + 1
    return k / len(conf), float(conf[order[k - 1]])


def at_threshold(conf, agree, t):
    ex = conf > t
    n = int(ex.sum())
    return {"exit_rate": round(n / len(conf), 4), "precision": round(float(agree[ex].float().mean()), 4) if n else None}


def metrics(logits, targets, vocab_ids, temperature, cal_thresholds=None):
    agree_ids = vocab_ids[logits.argmax(-1)]
    agree = agree_ids == targets
    res = {"top1": round(float(agree.float().mean()), 4)}
    for name, t in (("raw", 1.0), ("cal", temperature)):
        conf = torch.softmax(logits / t, -1).max(-1).values
        for p in (0.9, 0.8):
            r, th = exit_at_precision(conf, agree, p)
            if name == "raw":
                res[f"exit@p{p}"] = round(r, 4)
                res[f"thr@p{p}"] = round(th, 4) if th is not None else None
        res[f"{name}@0.9"] = at_threshold(conf, agree, 0.9)
        res[f"{name}@0.8"] = at_threshold(conf, agree, 0.8)
        # expected calibration error over 10 confidence bins
        bins = (conf * 10).clamp(max=9.999).long()
        ece = sum(abs(float(conf[bins == b].mean()) - float(agree[bins == b].float().mean())) * int((bins == b).sum())
                  for b in range(10) if (bins == b).any()) / len(conf)
        res[f"{name}_ece"] = round(ece, 4)
    if cal_thresholds is not None:  # thresholds chosen on the calibration split, applied here
        conf = torch.softmax(logits, -1).max(-1).values
        for p, th in cal_thresholds.items():
            res[f"calsplit_thr@p{p}"] = at_threshold(conf, agree, th) if th is not None else None
    return res


def time_eval(head, family, d, W, base, reps=200):
    """ms per evaluation of one position on the current threads (the adapter with 200 cached positions)."""
    norm_w, eps = base.model.norm.weight, base.config.rms_norm_eps
    h = torch.randn(1, d)
    with torch.inference_mode():
        if family == "adapter":
            cache = head.new_cache(512)
            head.step(torch.randn(200, d), cache)

            def one():
                x = head.step(h, cache)
                cache.truncate(200)
                z = F.linear(families._rms(x, norm_w, eps), W)
                return torch.softmax(z, -1).max()
        else:
            def one():
                z = head.logits(h, norm_w, eps, W)
                return torch.softmax(z, -1).max()
        for _ in range(20):
            one()
        t = time.perf_counter()
        for _ in range(reps):
            one()
    return (time.perf_counter() - t) / reps * 1e3


def time_layer(base, reps=50):
    """ms of one decode step of the whole base model (one token, 200 cached positions) / num_layers."""
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache(config=base.config)
        prompt = torch.randint(0, min(1000, base.config.vocab_size), (1, 200))
        base.model(input_ids=prompt, past_key_values=cache, use_cache=True)
        ids = torch.tensor([[7]])
        for _ in range(5):
            base.model(input_ids=ids, past_key_values=cache, use_cache=True)
            cache.crop(-1)
        t = time.perf_counter()
        for _ in range(reps):
            base.model(input_ids=ids, past_key_values=cache, use_cache=True)
            cache.crop(-1)
    step = (time.perf_counter() - t) / reps * 1e3
    return step / base.config.num_hidden_layers, step


def cmd_run(args):
    work = Path(args.work)
    base, tok, resolved = load_model()
    from adadecode.runtime.exit_heads import bundled_heads_path

    bundled = heads_file_tensors(bundled_heads_path())
    vocab_ids = bundled["vocab_ids"].long()
    W = base.lm_head.weight[vocab_ids].contiguous()
    layers = [int(x) for x in args.layers.split(",")]
    train_all = SeqStates.load(str(work / f"onpolicy_train{args.suffix}.pt"))
    val = SeqStates.load(str(work / f"onpolicy_validation{args.suffix}.pt"))
    # the calibration split: every 10th train sequence (from the 5th), never trained on
    cal_ids = [s for s in range(train_all.num_sequences) if s % 10 == 4]
    cal = train_all.subset(cal_ids)
    onp = train_all.subset([s for s in range(train_all.num_sequences) if s % 10 != 4])
    text = load_text(work, max(int(x) for x in args.train_tokens.split(",")))
    layer_ms, step_ms = time_layer(base)
    log(f"one decode step {step_ms:.2f} ms, one layer {layer_ms:.3f} ms ({torch.get_num_threads()} threads); "
        f"on-policy train {len(onp.targets)} positions in {onp.num_sequences} seqs, calibration {cal.tokens_scored}, "
        f"validation {val.tokens_scored} scored")
    results = {"model": resolved.origin, "threads": torch.get_num_threads(), "decode_step_ms": round(step_ms, 3),
               "layer_ms": round(layer_ms, 4), "validation_tokens": val.tokens_scored,
               "calibration_tokens": cal.tokens_scored, "vocab": len(vocab_ids), "runs": []}
    out = Path(args.out) if args.out else work / "results.json"
    if out.exists() and args.append:
        results["runs"] = json.loads(out.read_text())["runs"]

    def evaluate(heads, family, desc, n_train, seconds):
        row = {"family": family, "desc": desc, "train_positions": n_train, "train_seconds": round(seconds, 1),
               "layers": {}}
        for l, head in heads.items():
            zc = head_outputs(head, l, cal, base, W, family)
            agree_c = vocab_ids[zc.argmax(-1)] == cal.targets[cal.scored]
            temp = families.fit_temperature(zc, agree_c)
            head.temperature.fill_(temp)
            conf_c = torch.softmax(zc, -1).max(-1).values
            thr = {p: exit_at_precision(conf_c, agree_c, p)[1] for p in (0.9, 0.8)}
            z = head_outputs(head, l, val, base, W, family)
            m = metrics(z, val.targets[val.scored], vocab_ids, temp, thr)
            m["temperature"] = round(temp, 3)
            m["params"] = head.num_params()
            row["layers"][str(l)] = m
        l0 = next(iter(heads))
        ms = time_eval(heads[l0], family, base.config.hidden_size, W, base)
        row["eval_ms"] = round(ms, 4)
        row["eval_frac_layer"] = round(ms / layer_ms, 3)
        row["params_per_head"] = heads[l0].num_params()
        results["runs"].append(row)
        summary = " ".join(f"{l}:{m['top1']:.3f}/{m['exit@p0.9']:.3f}/{m['exit@p0.8']:.3f}"
                           for l, m in row["layers"].items())
        log(f"{family} [{desc}] top1/exit@.9/exit@.8: {summary}; {ms:.3f} ms/eval")
        out.write_text(json.dumps(results, indent=1))

    if args.baseline:
        heads = {l: families.LinearHead(base.config.hidden_size, bundled[f"T.{l}"].float()) for l in layers}
        evaluate(heads, "linear", "bundled heads (today)", 39775, 0.0)
    for n_text in [int(x) for x in args.train_tokens.split(",")] if args.family != "none" else []:
        if n_text and text is None:
            raise SystemExit("no text states: run `heads_study.py text` first")
        parts = [onp]
        if n_text:
            lens = (text.offsets[1:] - text.offsets[:-1]).cumsum(0)
            nseq = int(torch.searchsorted(lens, torch.tensor(n_text))) + 1
            parts.append(text.subset(range(min(nseq, text.num_sequences))))
        data = SeqStates.concat(parts) if len(parts) > 1 else onp
        n = len(data.targets)
        for family in [f for f in args.family.split(",") if f and f != "none"]:
            log(f"train {family} on {n} positions ({len(onp.targets)} on-policy + text), layers {layers}")
            heads, secs = train_family(family, layers, data, base, W, epochs=args.epochs, lr=args.lr,
                                       seed=args.seed, hidden=args.hidden,
                                       batch_tokens=args.batch_tokens, seq_tokens=args.seq_tokens,
                                       init_from=args.init_from, t_lr_scale=args.t_lr_scale)
            desc = (f"{family}: init {args.init_from} (T lr x{args.t_lr_scale}), {n_text} text + on-policy, "
                    f"{args.epochs} ep, hidden {args.hidden}, lr {args.lr}, seed {args.seed}")
            evaluate(heads, family.split(":")[0], desc, n, secs)
            if args.save:
                save_heads(Path(args.save) / family.replace(":", "-"), heads, family.split(":")[0], vocab_ids, base,
                           resolved, args)


def save_heads(path, heads, family, vocab_ids, base, resolved, args):
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {"vocab_ids": vocab_ids.to(torch.int32)}
    for l, h in heads.items():
        for name, t in h.state_dict().items():
            tensors[f"{family}.{l}.{name}"] = t.detach().float().contiguous().reshape(t.shape)
    save_file(tensors, str(path / "heads.safetensors"))
    h0 = next(iter(heads.values()))
    meta = {"head_type": family, "layers": sorted(heads), "base_model": {"fingerprint": resolved.fingerprint,
            "origin": resolved.origin}, "command": " ".join(sys.argv),
            "config": {k: getattr(h0, k) for k in ("heads", "kv_heads", "head_dim", "theta", "eps") if hasattr(h0, k)},
            "temperature": {str(l): float(h.temperature) for l, h in heads.items()}}
    (path / "meta.json").write_text(json.dumps(meta, indent=1))
    log(f"saved {family} heads to {path}")


if __name__ == "__main__":
    main()
