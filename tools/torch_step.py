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

    python3 tools/torch_step.py --from FILE [--threads 1] [--reps 5] [--steps 3]

times instead the batch msm4sr exported (`msm4sr bench --steps-from DATA --export FILE`: the same
samples, features and msm4sr's initial weights of each model, needs safetensors too) and first
prints each stage's loss of that batch at those weights without dropout or mixup, which must equal
msm4sr's (`tools/same_batch.sh` runs both programs side by side and compares).
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


def cmcl(a, b, targets):
    """Symmetric cross-modality contrastive loss (paper eq. 9-10): l(a, b) has the inter-view
    negatives (a_j, b_j') and the intra-view ones (a_j, a_j'), j' != j, same-target rows removed."""

    def one(a, b):
        an, bn = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        n = len(targets)
        eye = torch.eye(n, dtype=torch.bool, device=a.device)
        same = (targets[:, None] == targets[None, :]) & ~eye
        inter = (an @ bn.T / TAU).masked_fill(same, float("-inf"))
        intra = (an @ an.T / TAU).masked_fill(same | eye, float("-inf"))
        return F.cross_entropy(torch.cat([inter, intra], 1), torch.arange(n, device=a.device))

    return (one(a, b) + one(b, a)) / 2


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

    def pretrain(self, b, feats, bucketed, gen, p_mix=None):
        """NIP per modality and lambda * CMCL (no projection heads); `p_mix` the mixup ratio
        (default: uniform in [0, 0.5) per batch)."""
        uniq, inv = torch.unique(torch.cat([b["ids"].flatten(), b["targets"]]), return_inverse=True)
        zt = self.enc_t(feats["text"][0][uniq], feats["text"][1][uniq])
        zv = self.enc_v(feats["image"][0][uniq], feats["image"][1][uniq])
        zt, zv = zt * (uniq != 0)[:, None], zv * (uniq != 0)[:, None]
        n_ids = b["ids"].numel()
        loc, tloc = inv[:n_ids].view_as(b["ids"]), inv[n_ids:]
        ratio = torch.rand((), generator=gen, device=loc.device) * 0.5 if p_mix is None else p_mix
        swap = torch.rand(loc.shape, generator=gen, device=loc.device) < ratio
        rows = torch.cat([zt, zv])
        u = len(uniq)
        ids_t, ids_v = torch.where(swap, loc + u, loc), torch.where(swap, loc, loc + u)
        h = self.seq(rows, torch.cat([ids_t, ids_v]), torch.cat([b["lens"], b["lens"]]), bucketed)
        ht, hv = h[: len(b["lens"])], h[len(b["lens"]) :]
        t = b["targets"]
        return info_nce(ht, zt[tloc], t) + info_nce(hv, zv[tloc], t) + 0.01 * cmcl(ht, hv, t)


def load_msm4sr(model, w, prefix):
    """The initial weights msm4sr exported (`msm4sr bench --steps-from DATA --export FILE`) under
    `prefix` into `model`: msm4sr stores linear weights (in, out), the MoE's experts as one
    (d, O * d0) map with (O, d0) LayerNorm parameters, the gate as (d, O)."""
    g = lambda n: w[f"{prefix}.{n}"]
    sd = {}

    def lin(dst, src):
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = g(f"{src}.weight").T, g(f"{src}.bias")

    if f"{prefix}.item_embedding" in w:
        sd["emb.weight"] = g("item_embedding")
    sd["tr.pos.weight"] = g("transformer.position")
    sd["tr.ln.weight"], sd["tr.ln.bias"] = g("transformer.ln.weight"), g("transformer.ln.bias")
    for i in range(LAYERS):
        src = f"transformer.layer{i}"
        for a, b in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "dense"), ("f1", "ffn1"), ("f2", "ffn2")):
            lin(f"tr.layers.{i}.{a}", f"{src}.{b}")
        for n in ("ln1", "ln2"):
            sd[f"tr.layers.{i}.{n}.weight"], sd[f"tr.layers.{i}.{n}.bias"] = g(f"{src}.{n}.weight"), g(f"{src}.{n}.bias")
    for enc, src in (("enc_t", "text_encoder"), ("enc_v", "image_encoder")):
        if f"{prefix}.{src}.moe.gate" not in w:
            continue
        lin(f"{enc}.w1", f"{src}.pool.w1")
        lin(f"{enc}.w2", f"{src}.pool.w2")
        ew, eb = g(f"{src}.moe.experts.weight"), g(f"{src}.moe.experts.bias")
        for k in range(O):
            sd[f"{enc}.experts.{k}.weight"] = ew[:, k * D0 : (k + 1) * D0].T
            sd[f"{enc}.experts.{k}.bias"] = eb[k * D0 : (k + 1) * D0]
            sd[f"{enc}.norms.{k}.weight"], sd[f"{enc}.norms.{k}.bias"] = g(f"{src}.moe.ln.weight")[k], g(f"{src}.moe.ln.bias")[k]
        sd[f"{enc}.gate.weight"] = g(f"{src}.moe.gate").T
    missing = [n for n in sd if n not in dict(model.named_parameters())]
    assert not missing, f"no such parameters: {missing}"
    model.load_state_dict({n: t.contiguous() for n, t in sd.items()}, strict=False)
    return sorted(set(dict(model.named_parameters())) - set(sd))


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
    ap.add_argument("--from", dest="from_file", metavar="FILE", help="the batch, features and initial weights msm4sr exported "
                    "(msm4sr bench --steps-from DATA --export FILE): time that batch and print each stage's loss at those weights "
                    "without dropout or mixup")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads")
    ap.add_argument("--reps", type=int, default=1, help="timed repetitions of --steps steps each (median, min, max)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device(a.device)
    import glob
    import random

    g = torch.Generator(device=dev).manual_seed(0)
    w = None
    if a.from_file:
        from safetensors.torch import load_file

        w = load_file(a.from_file)
        ids, lens = w["batch.ids"].long(), w["batch.lens"].long()
        b = {"ids": ids.to(dev), "lens": lens.to(dev), "targets": w["batch.targets"].long().to(dev)}
        n_items = w["features.text"].shape[0] - 1
        feats = {m: (w[f"features.{m}"].to(dev), torch.full((n_items + 1,), w[f"features.{m}"].shape[1], device=dev)) for m in ("text", "image")}
        a.dim = w["features.text"].shape[2]
    else:
        samples, n_items = prefixes(glob.glob(f"{a.data}/*.inter")[0])
        random.Random(0).shuffle(samples)
        batch = samples[: a.batch]
        lens = torch.tensor([len(seq) for seq, _ in batch])
        ids = torch.zeros(len(batch), int(lens.max()), dtype=torch.long)
        for r, (s, _) in enumerate(batch):
            ids[r, : len(s)] = torch.tensor(s)
        b = {"ids": ids.to(dev), "lens": lens.to(dev), "targets": torch.tensor([t for _, t in batch]).to(dev)}
        feats = {
            m: ((torch.rand(n_items + 1, a.rows, a.dim, generator=g, device=dev) - 0.5), torch.full((n_items + 1,), a.rows, device=dev))
            for m in ("text", "image")
        }
    nb = len(b["lens"])
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
        reps = []
        for _ in range(max(1, a.reps)):
            sync()
            t0 = time.perf_counter()
            for _ in range(a.steps):
                step()
            sync()
            reps.append((time.perf_counter() - t0) / a.steps * 1e3)
        ms = sorted(reps)[len(reps) // 2]
        r = {"step": name, "layout": layout, "ms": ms, "min_ms": min(reps), "max_ms": max(reps), "reps": reps, "batch": nb,
             "tokens": int(lens.sum()), "items": n_items, "device": str(dev), "threads": torch.get_num_threads()}
        results.append(r)
        print(json.dumps(r) if a.json else f"{name:<10} {layout:<18} {ms:10.1f} ms/step (min {min(reps):.1f}, max {max(reps):.1f})", flush=True)

    model = Models(n_items, a.dim).to(dev)
    rows = feats["text"][0].shape[1]
    msg = f"batch {nb}, {int(lens.sum())} real positions (longest {int(lens.max())}), {n_items} items, features {rows}x{a.dim}, {dev}"
    print(json.dumps({"info": msg}) if a.json else msg, flush=True)
    model_sas = model
    if w is not None:
        # SASRec and MSM4SR start from msm4sr's initial weights of each (two models).
        model_sas = Models(n_items, a.dim).to(dev)
        load_msm4sr(model_sas, w, "sasrec")
        load_msm4sr(model, w, "msm4sr")
        for m in (model_sas, model):
            m.eval()  # dropout off for the check
        with torch.no_grad():
            checks = {
                "sasrec": model_sas.sasrec(b, False).item(),
                "pretrain": model.pretrain(b, feats, False, g, p_mix=0.0).item(),
                "finetune": model.finetune(b, feats, False).item(),
            }
        for m in (model_sas, model):
            m.train()
        for k, v in checks.items():
            r = {"check_loss": k, "loss": v}
            results.append(r)
            print(json.dumps(r) if a.json else f"{k:<10} loss at the initial weights, no dropout: {v:.8f}", flush=True)
    sas = [p for n, p in model_sas.named_parameters() if n.startswith(("emb", "tr"))]
    pre = [p for n, p in model.named_parameters() if not n.startswith("emb")]
    p_mix = 0.25 if w is not None else None
    fns = {"sasrec": model_sas.sasrec, "pretrain": lambda *x: model.pretrain(*x, p_mix=p_mix), "finetune": model.finetune}
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
