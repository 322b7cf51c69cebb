#!/usr/bin/env python3
"""A PyTorch peer for msm4sr's training steps on one GPU (or the CPU), written plainly from SPEC.md.

    python3 tools/torch_step.py [--data ../shared/data/pantry] [--device cuda] [--steps 20] [--compile]

One fixed batch of 1024 training samples drawn (seed 0) from the real training prefixes of the
dataset (RecBole's leave-one-out: every prefix of each user's sequence but the last two items,
truncated to the 50 most recent), the catalog of its items (Pantry: 4,926), random item features of
the paper's size (10 sentence and 10 image rows of 768 per item), hidden 64, 2 layers, 2 heads, inner
256, 8 experts. Timed, each after warm-up, in ms per step (forward, backward, Adam, loss read back):

  sasrec      ID embeddings, cross-entropy over all items
  pretrain    MSM4SR pre-training without projection heads (the authors' command): item encoders
              over the batch's items, mixup, NIP per modality and one CMCL term (in-batch InfoNCE,
              same-target negatives removed)
  finetune    MSM4SR fine-tuning: item encoders over all items, IDs added, cosine / tau scores,
              cross-entropy over all items

each padded to the batch's longest sequence (as PyTorch users run it) and bucketed by length (the
sequences of one length together, so no padding is computed), eager and, with --compile, under
torch.compile. --matmul also times torch.matmul (TF32 off) at 4096^2 and (4926x768)(768x512), the
cuBLAS reference of `msm4sr bench`. Needs only torch. Prints a table and, with --json, JSON lines.
"""
import argparse
import json
import math
import time
from collections import defaultdict

import torch
import torch.nn as nn
import torch.nn.functional as F

L, D0, HEADS, INNER, LAYERS, O, TAU = 50, 64, 2, 256, 2, 8, 0.07


def prefixes(path):
    """(sequence, target) training samples and the item count of a RecBole .inter file."""
    seqs = defaultdict(list)
    with open(path) as f:
        header = f.readline().rstrip("\n").split("\t")
        u, i, t = (header.index(next(h for h in header if h.startswith(k))) for k in ("user_id", "item_id", "timestamp"))
        for line in f:
            p = line.rstrip("\n").split("\t")
            seqs[p[u]].append((p[t], p[i]))
    items, out = {}, []
    for user in seqs.values():
        user.sort(key=lambda x: x[0])
        # Duplicates: keep the last interaction with an item.
        last = {}
        for k, (_, it) in enumerate(user):
            last[it] = k
        ids = [items.setdefault(it, len(items) + 1) for k, (_, it) in enumerate(user) if last[it] == k]
        if len(ids) < 5:
            continue
        for k in range(1, len(ids) - 2):
            out.append((ids[max(0, k - L):k], ids[k]))
    return out, len(items)


class Layer(nn.Module):
    """One post-LN transformer layer as RecBole's SASRec writes it (SPEC.md)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D0, D0) for _ in range(4))
        self.f1, self.f2 = nn.Linear(D0, INNER), nn.Linear(INNER, D0)
        self.ln1, self.ln2 = nn.LayerNorm(D0, eps=1e-12), nn.LayerNorm(D0, eps=1e-12)
        self.drop = nn.Dropout(0.2)

    def forward(self, x, mask):
        b, l, _ = x.shape
        dh = D0 // HEADS
        q, k, v = (m(x).view(b, l, HEADS, dh).transpose(1, 2) for m in (self.q, self.k, self.v))
        s = q @ k.transpose(-1, -2) / math.sqrt(dh) + mask
        a = self.drop(self.o((self.drop(s.softmax(-1)) @ v).transpose(1, 2).reshape(b, l, D0)))
        x1 = self.ln1(a + x)
        return self.ln2(self.drop(self.f2(F.gelu(self.f1(x1)))) + x1)


class Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos = nn.Embedding(L, D0)
        self.ln = nn.LayerNorm(D0, eps=1e-12)
        self.drop = nn.Dropout(0.2)
        self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))

    def forward(self, x, lens):
        """x (B, l, d0) left-aligned, lens (B): the output at each sequence's last valid position."""
        b, l, _ = x.shape
        h = self.drop(self.ln(x + self.pos.weight[:l]))
        ar = torch.arange(l, device=x.device)
        ok = (ar[None, None, :] <= ar[None, :, None]) & (ar[None, None, :] < lens[:, None, None])
        mask = torch.where(ok, 0.0, -10000.0)[:, None]
        for layer in self.layers:
            h = layer(h, mask)
        return h[torch.arange(b, device=x.device), lens - 1]


class Encoder(nn.Module):
    """Attention pooling over an item's rows, then the MoE adaptor (SPEC.md, M²SE 1-2)."""

    def __init__(self, d):
        super().__init__()
        self.w1, self.w2 = nn.Linear(d, 64), nn.Linear(64, 1)
        self.experts = nn.ModuleList(nn.Linear(d, D0) for _ in range(O))
        self.norms = nn.ModuleList(nn.LayerNorm(D0, eps=1e-12) for _ in range(O))
        self.gate = nn.Linear(d, O, bias=False)
        nn.init.zeros_(self.gate.weight)
        self.drop = nn.Dropout(0.2)

    def forward(self, x, lens):
        a = self.w2(self.w1(x)).squeeze(-1)
        a = a.masked_fill(torch.arange(x.shape[1], device=x.device)[None] >= lens[:, None], float("-inf"))
        alpha = torch.nan_to_num(a.softmax(-1))
        e = (alpha[..., None] * x).sum(1)
        g = self.gate(e).softmax(-1)
        z = torch.stack([n(self.drop(w(e))) for w, n in zip(self.experts, self.norms)], 1)
        return (g[..., None] * z).sum(1)


def info_nce(a, b, targets):
    """Mean InfoNCE of rows of a against rows of b (cosine / tau), same-target negatives removed."""
    s = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / TAU
    same = (targets[:, None] == targets[None, :]) & ~torch.eye(len(targets), dtype=torch.bool, device=a.device)
    return F.cross_entropy(s.masked_fill(same, float("-inf")), torch.arange(len(targets), device=a.device))


class Models(nn.Module):
    def __init__(self, n_items, d):
        super().__init__()
        self.emb = nn.Embedding(n_items + 1, D0, padding_idx=0)
        self.tr = Transformer()
        self.enc_t, self.enc_v = Encoder(d), Encoder(d)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)) and m is not self.enc_t.gate and m is not self.enc_v.gate:
                nn.init.normal_(m.weight, 0, 0.02)

    def seq(self, table, ids, lens, bucketed):
        """Sequence representations from item rows `table` (I+1, d0) for padded ids (B, l)."""
        if not bucketed:
            return self.tr(table[ids], lens)
        out = torch.empty(len(lens), D0, device=ids.device)
        for n in torch.unique(lens).tolist():
            rows = (lens == n).nonzero().squeeze(1)
            out[rows] = self.tr(table[ids[rows, :n]], lens[rows])
        return out

    def sasrec(self, b, bucketed):
        h = self.seq(self.emb.weight, b["ids"], b["lens"], bucketed)
        return F.cross_entropy(h @ self.emb.weight[1:].T, b["targets"] - 1)

    def finetune(self, b, feats, bucketed):
        loss_scores = 0
        for enc, (x, n) in ((self.enc_t, feats["text"]), (self.enc_v, feats["image"])):
            table = torch.cat([torch.zeros(1, D0, device=x.device), enc(x[1:], n[1:])]) + self.emb.weight
            h = F.normalize(self.seq(table, b["ids"], b["lens"], bucketed), dim=-1)
            loss_scores = loss_scores + h @ F.normalize(table[1:], dim=-1).T / TAU
        return F.cross_entropy(loss_scores, b["targets"] - 1)

    def pretrain(self, b, feats, bucketed, gen):
        uniq, inv = torch.unique(torch.cat([b["ids"].flatten(), b["targets"]]), return_inverse=True)
        zt = self.enc_t(feats["text"][0][uniq], feats["text"][1][uniq])
        zv = self.enc_v(feats["image"][0][uniq], feats["image"][1][uniq])
        zt, zv = zt * (uniq != 0)[:, None], zv * (uniq != 0)[:, None]
        n_ids = b["ids"].numel()
        loc, tloc = inv[:n_ids].view_as(b["ids"]), inv[n_ids:]
        swap = torch.rand(loc.shape, generator=gen, device=loc.device) < torch.rand((), generator=gen, device=loc.device) * 0.5
        rows = torch.cat([zt, zv])
        u = len(uniq)
        ids_t, ids_v = torch.where(swap, loc + u, loc), torch.where(swap, loc, loc + u)
        h = self.seq(rows, torch.cat([ids_t, ids_v]), torch.cat([b["lens"], b["lens"]]), bucketed)
        ht, hv = h[: len(b["lens"])], h[len(b["lens"]) :]
        t = b["targets"]
        return info_nce(ht, zt[tloc], t) + info_nce(hv, zv[tloc], t) + 0.01 * info_nce(ht, hv, t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/pantry")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--rows", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="also time under torch.compile")
    ap.add_argument("--matmul", action="store_true", help="also time torch.matmul (TF32 off)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device(a.device)
    import glob
    import random

    samples, n_items = prefixes(glob.glob(f"{a.data}/*.inter")[0])
    random.Random(0).shuffle(samples)
    batch = samples[: a.batch]
    lens = torch.tensor([len(seq) for seq, _ in batch])
    ids = torch.zeros(len(batch), int(lens.max()), dtype=torch.long)
    for r, (s, _) in enumerate(batch):
        ids[r, : len(s)] = torch.tensor(s)
    b = {"ids": ids.to(dev), "lens": lens.to(dev), "targets": torch.tensor([t for _, t in batch]).to(dev)}
    g = torch.Generator(device=dev).manual_seed(0)
    feats = {
        m: ((torch.rand(n_items + 1, a.rows, a.dim, generator=g, device=dev) - 0.5), torch.full((n_items + 1,), a.rows, device=dev))
        for m in ("text", "image")
    }
    results = []

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def time_step(name, layout, fn, params):
        opt = torch.optim.Adam(params, lr=1e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = fn()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            return loss.item()

        for _ in range(3):
            step()
        sync()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step()
        sync()
        ms = (time.perf_counter() - t0) / a.steps * 1e3
        r = {"step": name, "layout": layout, "ms": ms, "batch": len(batch), "tokens": int(lens.sum()), "items": n_items, "device": str(dev)}
        results.append(r)
        print(json.dumps(r) if a.json else f"{name:<10} {layout:<18} {ms:10.1f} ms/step", flush=True)

    model = Models(n_items, a.dim).to(dev)
    print(f"batch {len(batch)}, {int(lens.sum())} real positions (longest {int(lens.max())}), {n_items} items, features {a.rows}x{a.dim}, {dev}")
    sas = [p for n, p in model.named_parameters() if n.startswith(("emb", "tr"))]
    pre = [p for n, p in model.named_parameters() if not n.startswith("emb")]
    fns = {"sasrec": model.sasrec, "pretrain": model.pretrain, "finetune": model.finetune}
    modes = [("eager", fns)]
    if a.compile:
        # Compiled in the padded layout only: bucketing by length would recompile per length.
        modes.append(("compiled", {k: torch.compile(f) for k, f in fns.items()}))
    for mode, f in modes:
        for bucketed in (False, True) if mode == "eager" else (False,):
            layout = f"{mode} {'bucketed' if bucketed else 'padded'}"
            time_step("sasrec", layout, lambda: f["sasrec"](b, bucketed), sas)
            time_step("pretrain", layout, lambda: f["pretrain"](b, feats, bucketed, g), pre)
            time_step("finetune", layout, lambda: f["finetune"](b, feats, bucketed), list(model.parameters()))
    if a.matmul:
        for (mm, k, n) in ((4096, 4096, 4096), (n_items, a.dim, 512)):
            x, y = torch.randn(mm, k, device=dev), torch.randn(k, n, device=dev)
            for _ in range(3):
                x @ y
            sync()
            t0, reps = time.perf_counter(), 20
            for _ in range(reps):
                x @ y
            sync()
            s = (time.perf_counter() - t0) / reps
            r = {"matmul": f"{mm}x{k}x{n}", "ms": s * 1e3, "gflops": 2 * mm * k * n / s / 1e9, "device": str(dev)}
            results.append(r)
            print(json.dumps(r) if a.json else f"matmul {mm}x{k}x{n}: {s * 1e3:.3f} ms, {r['gflops']:.0f} GFLOP/s (TF32 off)", flush=True)


if __name__ == "__main__":
    main()
