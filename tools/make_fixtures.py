#!/usr/bin/env python3
"""Write PyTorch golden fixtures for the engine's ops and composed MSM4SR blocks.

    pip install torch safetensors numpy
    python3 tools/make_fixtures.py            # writes kernels-tests/fixtures/*.safetensors
    python3 tools/make_fixtures.py NAME ...   # writes only those (the random draws stay the same)

Each file holds, for one case:
  x.NAME   float32 differentiable inputs (parameters use the engine's layouts: Linear weights (in, out))
  c.NAME   int32 constants (lengths, ids, targets)
  out      the output
  w        fixed loss weights, loss = sum(out * w)
  g.NAME   d loss / d x.NAME
The reference is computed in float64 by PyTorch on the CPU, written independently of the engine from
the definitions in SPEC.md (RecBole's SASRec layer, the paper's attention pooling and MoE, eq. 7 and 9).
"""
import math
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels-tests", "fixtures")
gen = torch.Generator().manual_seed(1234)
ONLY = set()


def randn(*shape, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float32) * scale).double()


def save(name, inputs, consts, fn):
    xs = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    out = fn(xs, consts)
    w = randn(*out.shape) if out.dim() > 0 else randn(1).reshape(())
    (out * w).sum().backward()
    t = {"out": out.detach().float().contiguous(), "w": w.float().contiguous()}
    for k, v in xs.items():
        t["x." + k] = v.detach().float().contiguous()
        t["g." + k] = v.grad.float().contiguous()
    for k, v in consts.items():
        t["c." + k] = torch.tensor(v, dtype=torch.int32).contiguous()
    if ONLY and name not in ONLY:
        return
    save_file(t, os.path.join(OUT, name + ".safetensors"))
    print(f"{name:16s} out {tuple(out.shape)}")


def masked_softmax(a, lens):
    """Softmax over the first lens[r] entries of each row; other entries and empty rows give 0."""
    s = a.shape[-1]
    valid = torch.arange(s)[None, :] < torch.tensor(lens)[:, None]
    e = torch.where(valid, a, torch.full_like(a, -math.inf))
    p = torch.softmax(e, dim=-1)
    return torch.where(valid, p, torch.zeros_like(p))


def recbole_attention(q, k, v, lens, heads):
    """RecBole MultiHeadAttention core: additive -10000 mask (causal + key padding), no dropout."""
    b, l, c = q.shape
    dh = c // heads
    sp = lambda t: t.view(b, l, heads, dh).permute(0, 2, 1, 3)
    s = sp(q) @ sp(k).transpose(-1, -2) / math.sqrt(dh)
    causal = torch.tril(torch.ones(l, l, dtype=torch.bool))
    keypad = torch.arange(l)[None, :] < torch.tensor(lens)[:, None]  # (b, l)
    allowed = causal[None, None] & keypad[:, None, None, :]
    s = s + torch.where(allowed, 0.0, -10000.0)
    p = torch.softmax(s, dim=-1)
    return (p @ sp(v)).permute(0, 2, 1, 3).reshape(b, l, c)


def ragged_attention(q, k, v, lens, heads, causal):
    """Attention within each packed sequence (rows offsets[b] .. offsets[b + 1]), written per
    sequence with an explicit softmax over its allowed keys: causal (key j <= query i) or not."""
    out, o = [], 0
    for n in lens:
        c = q.shape[1]
        dh = c // heads
        sp = lambda t: t[o:o + n].view(n, heads, dh).transpose(0, 1)  # (heads, n, dh)
        s = sp(q) @ sp(k).transpose(-1, -2) / math.sqrt(dh)
        if causal:
            s = s.masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool)), -math.inf)
        out.append((torch.softmax(s, -1) @ sp(v)).transpose(0, 1).reshape(n, c))
        o += n
    return torch.cat(out)


def ragged_mean(x, lens):
    out, o = [], 0
    for n in lens:
        out.append(x[o:o + n].mean(0))
        o += n
    return torch.stack(out)


def ln(x, g, b):
    return F.layer_norm(x, x.shape[-1:], eps=1e-12) * g + b


def sasrec_layer(x, p, lens, heads):
    """One RecBole TransformerLayer (post-LN), eval mode."""
    q, k, v = x @ p["wq"] + p["bq"], x @ p["wk"] + p["bk"], x @ p["wv"] + p["bv"]
    a = recbole_attention(q, k, v, lens, heads) @ p["wo"] + p["bo"]
    x1 = ln(a + x, p["ln1_g"], p["ln1_b"])
    f = F.gelu(x1 @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return ln(f + x1, p["ln2_g"], p["ln2_b"])


def item_encoder(x, p, lens, experts):
    """Attention pooling (eq. 3, padding masked) + MoE adaptor (eq. 4-5), eval mode."""
    a = ((x @ p["pw1"] + p["pb1"]) @ p["pw2"] + p["pb2"]).squeeze(-1)  # (n, s)
    alpha = masked_softmax(a, lens)
    e = (alpha[..., None] * x).sum(1)  # (n, d)
    n = e.shape[0]
    ex = (e @ p["ew"] + p["eb"]).view(n, experts, -1)  # (n, o, d0)
    ex = F.layer_norm(ex, ex.shape[-1:], eps=1e-12) * p["ln_g"] + p["ln_b"]
    g = torch.softmax(e @ p["gw"], dim=-1)
    return (g[..., None] * ex).sum(1)


def cos(a, b):
    return F.normalize(a, dim=-1, eps=1e-12) @ F.normalize(b, dim=-1, eps=1e-12).T


def nip(m_hat, m_til, z, targets, tau):
    """Eq. 7 as a batch mean; same-target off-diagonal entries are dropped from the denominator."""
    t = torch.tensor(targets)
    keep = (t[:, None] != t[None, :]) | torch.eye(len(targets), dtype=torch.bool)
    f1, f2 = torch.exp(cos(m_hat, z) / tau), torch.exp(cos(m_til, z) / tau)
    num = torch.diagonal(f1) + torch.diagonal(f2)
    den = ((f1 + f2) * keep).sum(1)
    return -(torch.log(num / den)).mean()


def cmcl(a, b, targets, tau):
    """Eq. 9 (symmetric) as a batch mean, same-target negatives removed."""
    t = torch.tensor(targets)
    n = len(targets)
    eye = torch.eye(n, dtype=torch.bool)
    other = t[:, None] != t[None, :]

    def ell(u, v):
        inter = torch.exp(cos(u, v) / tau) * (other | eye)
        intra = torch.exp(cos(u, u) / tau) * other
        return torch.log(torch.diagonal(inter) / (inter.sum(1) + intra.sum(1)))

    return -0.5 * (ell(a, b) + ell(b, a)).mean()


def main():
    os.makedirs(OUT, exist_ok=True)
    save("matmul", {"a": randn(2, 5, 7), "b": randn(7, 3)}, {}, lambda x, c: x["a"] @ x["b"])
    save("linear", {"x": randn(2, 3, 6), "w": randn(6, 5), "b": randn(5)}, {}, lambda x, c: x["x"] @ x["w"] + x["b"])
    save("layernorm", {"x": randn(6, 37, scale=3.0) + 2.0, "g": randn(37), "b": randn(37)}, {}, lambda x, c: ln(x["x"], x["g"], x["b"]))
    save("softmax", {"x": randn(5, 9, scale=3.0)}, {"lens": [9, 3, 0, 1, 5]}, lambda x, c: masked_softmax(x["x"], c["lens"]))
    save("gelu", {"x": randn(64, scale=3.0)}, {}, lambda x, c: F.gelu(x["x"]))
    save("l2norm", {"x": randn(5, 8)}, {}, lambda x, c: F.normalize(x["x"], dim=-1, eps=1e-12))
    save("attention", {"q": randn(2, 5, 6), "k": randn(2, 5, 6), "v": randn(2, 5, 6)}, {"lens": [5, 2]},
         lambda x, c: recbole_attention(x["q"], x["k"], x["v"], c["lens"], 2))
    save("attention_pool", {"a": randn(4, 6), "x": randn(4, 6, 5)}, {"lens": [6, 2, 0, 1]},
         lambda x, c: (masked_softmax(x["a"], c["lens"])[..., None] * x["x"]).sum(1))
    save("moe", {"logits": randn(5, 4), "experts": randn(5, 4, 3)}, {},
         lambda x, c: (torch.softmax(x["logits"], -1)[..., None] * x["experts"]).sum(1))
    save("embedding", {"w": randn(10, 4)}, {"ids": [[3, 0, 3], [9, 3, 1]]}, lambda x, c: x["w"][torch.tensor(c["ids"])])
    save("gather_last", {"x": randn(3, 5, 4)}, {"lens": [5, 1, 3]},
         lambda x, c: x["x"][torch.arange(3), torch.tensor(c["lens"]) - 1])
    save("cross_entropy", {"logits": randn(4, 11, scale=5.0)}, {"targets": [3, 0, 10, 3]},
         lambda x, c: F.cross_entropy(x["logits"], torch.tensor(c["targets"]).long()))
    tgt = [0, 1, 0, 2, 3, 1]
    save("nip", {"m_hat": randn(6, 8), "m_til": randn(6, 8), "z": randn(6, 8)}, {"targets": tgt},
         lambda x, c: nip(x["m_hat"], x["m_til"], x["z"], c["targets"], 0.07))
    save("cmcl", {"a": randn(6, 8), "b": randn(6, 8)}, {"targets": tgt}, lambda x, c: cmcl(x["a"], x["b"], c["targets"], 0.07))

    c, inner = 8, 16
    lp = {"wq": randn(c, c, scale=0.3), "bq": randn(c, scale=0.1), "wk": randn(c, c, scale=0.3), "bk": randn(c, scale=0.1),
          "wv": randn(c, c, scale=0.3), "bv": randn(c, scale=0.1), "wo": randn(c, c, scale=0.3), "bo": randn(c, scale=0.1),
          "ln1_g": 1.0 + randn(c, scale=0.1), "ln1_b": randn(c, scale=0.1), "w1": randn(c, inner, scale=0.3), "b1": randn(inner, scale=0.1),
          "w2": randn(inner, c, scale=0.3), "b2": randn(c, scale=0.1), "ln2_g": 1.0 + randn(c, scale=0.1), "ln2_b": randn(c, scale=0.1)}
    save("sasrec_layer", {"x": randn(3, 6, c), **lp}, {"lens": [6, 3, 1]},
         lambda x, k: sasrec_layer(x["x"], x, k["lens"], 2))

    d, o, d0 = 12, 3, 8
    ep = {"pw1": randn(d, 64, scale=0.2), "pb1": randn(64, scale=0.1), "pw2": randn(64, 1, scale=0.2), "pb2": randn(1, scale=0.1),
          "ew": randn(d, o * d0, scale=0.3), "eb": randn(o * d0, scale=0.1), "ln_g": 1.0 + randn(o, d0, scale=0.1),
          "ln_b": randn(o, d0, scale=0.1), "gw": randn(d, o, scale=0.3)}
    save("item_encoder", {"x": randn(5, 4, d), **ep}, {"lens": [4, 2, 0, 1, 3]},
         lambda x, k: item_encoder(x["x"], x, k["lens"], o))

    # Ragged (packed) batches: sequences of 4, 1 and 3 rows, 8 rows in all.
    rl = [4, 1, 3]
    for causal in (True, False):
        save("attention_ragged_" + ("causal" if causal else "bidir"),
             {"q": randn(8, 6), "k": randn(8, 6), "v": randn(8, 6)}, {"lens": rl},
             lambda x, c: ragged_attention(x["q"], x["k"], x["v"], c["lens"], 2, causal))
    save("mean_ragged", {"x": randn(8, 5)}, {"lens": rl}, lambda x, c: ragged_mean(x["x"], c["lens"]))


if __name__ == "__main__":
    import sys
    ONLY.update(sys.argv[1:])
    torch.set_default_dtype(torch.float64)
    main()
