#!/usr/bin/env python3
"""Write the CLIP fixtures of kernels-tests/fixtures/clip/ (a tiny random CLIP and its references).

1. `model/`: a tiny randomly initialised `transformers.CLIPModel` in the Hugging Face CLIP folder
   layout: `config.json` (CLIPConfig.save_pretrained, every field written), `model.safetensors`
   (HF tensor names, float16), `tokenizer.json` (+ `tokenizer_config.json`,
   `special_tokens_map.json`) and `preprocessor_config.json` (the openai/clip-vit-base-patch32
   one: shortest edge 224, bicubic, center crop 224x224, rescale 1/255, CLIP mean/std, RGB).
   Vision: ViT-B/32 geometry (224 px, 32 px patches: 49 patches + class token), hidden 24, MLP 48,
   2 layers, 4 heads, quick_gelu. Text: vocabulary 49408, 77 positions, hidden 16, MLP 32,
   2 layers, 4 heads, quick_gelu, bos 49406, eos 49407, pad 1. Projection 8, default logit_scale,
   layer_norm_eps 1e-5. The weights are torch.manual_seed(0) initialisation, then every LayerNorm
   weight is multiplied by a random factor in [0.5, 1.5] and gets a random bias, and the class,
   position and token embeddings are rescaled to std 0.5 (HF initialises the position and token
   embeddings at std 0.02, where they hardly matter).
   eos_token_id is written explicitly as 49407: CLIPTextTransformer then pools the hidden state at
   the FIRST position whose id == eos_token_id (with the legacy eos_token_id == 2 of the original
   OpenAI configs it pools at argmax(input_ids); both are the same position for CLIP's vocabulary,
   where <|endoftext|> = 49407 is the largest id).
   Every reference below comes from the model RELOADED from this folder in float64
   (`CLIPModel.from_pretrained(dir, torch_dtype=torch.float64, attn_implementation="eager")`), so
   the references are exactly those of the float16-rounded weights. The attention and MLP weights
   are scaled up over HF's init (ATTN_SCALE, MLP_SCALE, PATCH_SCALE) so that different images and
   words get clearly different embeddings.
2. `images/`: deterministic generated images (smooth structure + noise) of awkward sizes and modes:
   a.png RGB 300x200, b.jpg RGB 157x233 (quality 92), c.png L 250x250, d.png RGBA 99x180
   (upsampled), e.webp RGB 640x360 (lossless; skipped when Pillow has no WebP), f.jpg L 224x300.
3. `ref.safetensors` + `ref.json`: per image the processor's pixel values, image embeddings and
   the pooled vision output; per word of a ~40 word list the token ids, the text embeddings (plain
   and in the template "a photo of {}.") and the pooled text output; per image the 5 words of the
   list nearest in cosine (float64). See README.md in the output folder for the key list. The
   script also checks the processor's pixel values bit for bit against the pipeline written out in
   `explicit_pixels` (Pillow's fixed-point bicubic resize, crop, rescale, normalise).

Tokenizer. The vocabulary is OpenAI CLIP's `bpe_simple_vocab_16e6.txt.gz` (sha256
924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a), taken out of the PyPI wheel
of open_clip_torch (`pip download --no-deps open_clip_torch -d /tmp/openclip`; the script reads
open_clip/bpe_simple_vocab_16e6.txt.gz and open_clip/tokenizer.py from the wheel). vocab.json and
merges.txt are built exactly as OpenAI's SimpleTokenizer does (merges = lines[1:49152-256-2+1];
vocab = the 256 byte symbols, the same + '</w>', one per merge, <|startoftext|>, <|endoftext|>:
49408 entries). `transformers.CLIPTokenizer` (slow) and `CLIPTokenizerFast` are built from these
files, and for every test text the script asserts that slow, fast, the saved tokenizer.json (via
the `tokenizers` library, the Rust crate underneath) and open_clip's own SimpleTokenizer give the
same ids. The slow tokenizer only matches OpenAI when `ftfy` is installed (without it, it falls
back to BERT's BasicTokenizer, which splits CJK characters: "日本" then tokenizes differently), so
the script requires ftfy. Known difference not exercised here: OpenAI/slow html-unescape the text
("&amp;" -> "&"), the fast tokenizer (tokenizer.json) does not.
tokenizer.json is saved with no truncation and no padding; callers truncate to 77 tokens
themselves (HF keeps <|startoftext|> + 75 tokens + <|endoftext|>).

Environment: transformers 4.40-4.49, torch (CPU), numpy, pillow, safetensors, ftfy, e.g.
    python3 -m venv /tmp/clipfx
    echo /path/to/site-packages/with/torch > /tmp/clipfx/lib/python3.11/site-packages/torch.pth
    /tmp/clipfx/bin/pip install "transformers>=4.40,<4.50" safetensors pillow ftfy
    /tmp/clipfx/bin/pip download --no-deps open_clip_torch -d /tmp/openclip

Usage: /tmp/clipfx/bin/python tools/make_clip_fixtures.py [--open-clip-wheel WHL]
           [--out kernels-tests/fixtures/clip]
"""

import argparse
import glob
import gzip
import hashlib
import importlib.util
import io
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, features  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
MAX_TOKENS = 77
TOP_N = 5
TEMPLATE = "a photo of {}."
NOISE_STD = 6.0
# Extra scale of the attention (q, k, v, out) and MLP weights of both towers and of the patch
# embedding over HF's init: with HF's init every image gets nearly the same embedding (the class
# token hardly looks at the patches) and every word nearly the same text embedding.
ATTN_SCALE, MLP_SCALE, PATCH_SCALE = 5.0, 3.0, 2.0

LONG = (
    "A very long description of an office desk: a black calculator, a red stapler, three yellow "
    "post-it notes, a stack of A4 paper, two blue ball-point pens, a USB stick, a coffee mug with a "
    "chipped handle, a pair of scissors, a roll of tape, paper clips, a desk lamp, a laptop with a "
    "cracked screen, an old keyboard, a wireless mouse, a printed calendar for 2024, and a small "
    "potted cactus next to the window."
)
WORDS = [
    "calculator",
    "stapler",
    "paper",
    "blue",
    "red",
    "green",
    "scissors",
    "pencil",
    "keyboard",
    "laptop",
    "monitor",
    "envelope",
    "desk lamp",
    "coffee mug",
    "office chair",
    "paper clip",
    "rubber band",
    "dog",
    "cat",
    "sunset",
    "post-it",
    "don't",
    '3.5"',
    "a/b",
    "e-mail",
    "U.S.A.",
    "50%",
    "(note)",
    "USB",
    "HDMI Cable",
    "café",
    "naïve",
    "straße",
    "日本",
    "Москва",
    "emoji 😀",
    "  x  ",
    "tab\tseparated",
    "2024",
    LONG,
]

# name, (width, height), PIL mode, format, save options, noise block size, posterisation step
IMAGES = [
    ("a.png", (300, 200), "RGB", "PNG", {"optimize": True}, 4, 8),
    ("b.jpg", (157, 233), "RGB", "JPEG", {"quality": 92}, 4, 8),
    ("c.png", (250, 250), "L", "PNG", {"optimize": True}, 4, 8),
    ("d.png", (99, 180), "RGBA", "PNG", {"optimize": True}, 4, 8),
    ("e.webp", (640, 360), "RGB", "WEBP", {"lossless": True, "quality": 100, "method": 6}, 8, 16),
    ("f.jpg", (224, 300), "L", "JPEG", {"quality": 92}, 4, 8),
]

PREPROCESSOR = dict(
    do_resize=True,
    size={"shortest_edge": 224},
    resample=3,  # PIL.Image.BICUBIC
    do_center_crop=True,
    crop_size={"height": 224, "width": 224},
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
    image_mean=[0.48145466, 0.4578275, 0.40821073],
    image_std=[0.26862954, 0.26130258, 0.27577711],
    do_convert_rgb=True,
)


# ---------------------------------------------------------------------------------------------
# Tokenizer


def bytes_to_unicode():
    """OpenAI CLIP's byte -> unicode symbol table (clip/simple_tokenizer.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def find_wheel(arg):
    if arg:
        return Path(arg)
    found = sorted(glob.glob("/tmp/openclip/open_clip_torch-*.whl"))
    if not found:
        raise SystemExit("no open_clip_torch wheel: pip download --no-deps open_clip_torch -d /tmp/openclip")
    return Path(found[-1])


def build_tokenizers(wheel: Path, work: Path):
    """vocab.json + merges.txt as OpenAI's SimpleTokenizer; slow, fast and open_clip tokenizers."""
    import ftfy  # noqa: F401  (the slow CLIPTokenizer only matches OpenAI with ftfy)
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    with zipfile.ZipFile(wheel) as z:
        gz = z.read("open_clip/bpe_simple_vocab_16e6.txt.gz")
        (work / "open_clip_tokenizer.py").write_bytes(z.read("open_clip/tokenizer.py"))
    assert hashlib.sha256(gz).hexdigest() == VOCAB_SHA256, "unexpected bpe_simple_vocab_16e6.txt.gz"
    (work / "bpe_simple_vocab_16e6.txt.gz").write_bytes(gz)
    lines = gzip.decompress(gz).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408 and len(set(vocab)) == 49408
    (work / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    # HF's merges.txt: a "#version" line (skipped by CLIPTokenizer, as line 0 is by OpenAI), then the merges.
    (work / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")

    slow = CLIPTokenizer(str(work / "vocab.json"), str(work / "merges.txt"), model_max_length=MAX_TOKENS)
    fast = CLIPTokenizerFast(str(work / "vocab.json"), str(work / "merges.txt"), model_max_length=MAX_TOKENS)
    assert slow.bos_token_id == fast.bos_token_id == 49406
    assert slow.eos_token_id == fast.eos_token_id == 49407

    spec = importlib.util.spec_from_file_location("open_clip_tokenizer", work / "open_clip_tokenizer.py")
    oc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(oc)
    ref = oc.SimpleTokenizer(str(work / "bpe_simple_vocab_16e6.txt.gz"))
    return slow, fast, ref


def save_tokenizer(fast, model_dir: Path):
    """tokenizer.json (compact, no truncation/padding) + tokenizer_config.json + special_tokens_map.json."""
    backend = fast.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    tmp = model_dir / "_tok"
    fast.save_pretrained(str(tmp))
    for name in ["tokenizer_config.json", "special_tokens_map.json"]:
        shutil.copy(tmp / name, model_dir / name)
    shutil.rmtree(tmp)
    tj = json.loads(backend.to_str())
    # Merges as "a b" strings (the format of the Hub's CLIP tokenizer.json files, and smaller); no
    # CLIP symbol contains a space.
    merges = tj["model"]["merges"]
    if merges and isinstance(merges[0], list):
        assert not any(" " in a or " " in b for a, b in merges)
        tj["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    (model_dir / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")


def token_ids(texts, slow, fast, ref, tok_json: Path):
    """Ids (start/end included, truncated at 77) from the slow tokenizer; asserts the others agree."""
    from tokenizers import Tokenizer

    rust = Tokenizer.from_file(str(tok_json))
    rust.enable_truncation(MAX_TOKENS)
    out = []
    for t in texts:
        a = slow(t, truncation=True, max_length=MAX_TOKENS)["input_ids"]
        b = fast(t, truncation=True, max_length=MAX_TOKENS)["input_ids"]
        c = rust.encode(t).ids
        d = ref(t, context_length=MAX_TOKENS)[0].tolist()
        d = d[: d.index(49407) + 1]
        assert a == b == c == d, (t, a, b, c, d)
        assert a[0] == 49406 and a[-1] == 49407 and 49407 not in a[:-1] and len(a) <= MAX_TOKENS
        out.append(a)
    return out


# ---------------------------------------------------------------------------------------------
# Images


def make_image(idx: int, size, mode: str, block: int, step: int) -> Image.Image:
    """Smooth structure (gradients, waves, a disc, a stripe band; posterised to multiples of `step`
    so that the files stay small) plus blocky noise; deterministic."""
    w, h = size
    rng = np.random.default_rng(1000 + idx)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    u, v = x / w, y / h
    ph = rng.uniform(0, 2 * np.pi, 3)
    fr = rng.uniform(1.5, 4.0, 3)
    cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
    disc = (((u - cx) * w) ** 2 + ((v - cy) * h) ** 2) < (r * min(w, h)) ** 2
    chans = []
    for c in range(3):
        s = 110 + 60 * np.sin(2 * np.pi * fr[c] * (u + (c + 1) * 0.3 * v) + ph[c]) + 50 * (u - v) * (1 - 2 * (c % 2))
        s = np.where(disc, 255 - s * 0.7, s)
        band = (np.abs(v - 0.8 + 0.2 * u) < 0.04) & ((x // 3) % 2 == 0)  # fine stripes: aliasing matters
        s = np.where(band, 20 + 200 * (c == idx % 3), s)
        chans.append(s)
    img = np.round(np.stack(chans, -1) / step) * step
    # Blocky noise: resampling sees it, the lossless codecs still compress it.
    b = block
    noise = rng.normal(0, NOISE_STD, (-(-h // b), -(-w // b), 1)).repeat(b, 0).repeat(b, 1)[:h, :w]
    img = np.clip(np.rint(img + noise), 0, 255).astype(np.uint8)
    if mode == "L":
        return Image.fromarray(img, "RGB").convert("L")
    if mode == "RGBA":
        alpha = np.clip(np.rint(255 * (0.2 + 0.8 * u * (1 - 0.5 * v))), 0, 255).astype(np.uint8)
        return Image.fromarray(np.dstack([img, alpha]), "RGBA")
    return Image.fromarray(img, "RGB")


def write_images(img_dir: Path):
    img_dir.mkdir(parents=True, exist_ok=True)
    done, skipped = [], []
    for idx, (name, size, mode, fmt, opts, block, step) in enumerate(IMAGES):
        if fmt == "WEBP" and not features.check("webp"):
            skipped.append(name)
            continue
        im = make_image(idx, size, mode, block, step)
        buf = io.BytesIO()
        im.save(buf, format=fmt, **opts)
        (img_dir / name).write_bytes(buf.getvalue())
        done.append(name)
    return done, skipped


def _bicubic(x: float) -> float:
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


def _pillow_pass(img: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """One pass of Pillow's 8-bit separable resampling (libImaging/Resample.c: precompute_coeffs,
    normalize_coeffs_8bpc, ImagingResample{Horizontal,Vertical}_8bpc), BICUBIC (a = -0.5, support 2)."""
    precision = 32 - 8 - 2
    in_size = img.shape[axis]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    a = np.moveaxis(img.astype(np.int64), axis, 0)
    out = np.empty((out_size,) + a.shape[1:], np.int64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        w = [_bicubic((x + xmin - center + 0.5) / filterscale) for x in range(xmax)]
        ww = sum(w)
        if ww != 0.0:
            w = [v / ww for v in w]
        k = [int(-0.5 + v * (1 << precision)) if v < 0 else int(0.5 + v * (1 << precision)) for v in w]
        acc = np.full(a.shape[1:], 1 << (precision - 1), np.int64)
        for j, kj in enumerate(k):
            acc += a[xmin + j] * kj
        out[xx] = np.clip(acc >> precision, 0, 255)  # clip8: arithmetic shift, then clamp
    return np.moveaxis(out, 0, axis).astype(np.uint8)


def explicit_pixels(rgb: np.ndarray, resized_hw, crop_top_left) -> np.ndarray:
    """The processor's pipeline written out (checked equal to CLIPImageProcessor, bit for bit):
    Pillow bicubic resize (horizontal pass, then vertical, uint8 in between; a copy when the size is
    unchanged), crop, float64 * (1/255) -> float32, (x - mean) / std in float32, HWC -> CHW."""
    (rh, rw), (top, left) = resized_hw, crop_top_left
    x = rgb
    if x.shape[1] != rw:
        x = _pillow_pass(x, rw, 1)
    if x.shape[0] != rh:
        x = _pillow_pass(x, rh, 0)
    x = x[top : top + 224, left : left + 224]
    x = (x.astype(np.float64) * PREPROCESSOR["rescale_factor"]).astype(np.float32)
    mean = np.array(PREPROCESSOR["image_mean"], np.float32)
    std = np.array(PREPROCESSOR["image_std"], np.float32)
    return ((x - mean) / std).transpose(2, 0, 1)


def resize_plan(w: int, h: int, short: int = 224, crop: int = 224):
    """The processor's resized (height, width) and crop offsets (top, left), recomputed for ref.json."""
    s, lg = (w, h) if w <= h else (h, w)
    new_s, new_l = short, int(short * lg / s)
    rh, rw = (new_l, new_s) if w <= h else (new_s, new_l)
    return [rh, rw], [(rh - crop) // 2, (rw - crop) // 2]


# ---------------------------------------------------------------------------------------------
# Model


def make_model(model_dir: Path):
    from safetensors.torch import save_file as save_torch
    from transformers import CLIPConfig, CLIPModel

    text = dict(
        vocab_size=49408,
        max_position_embeddings=MAX_TOKENS,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=8,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )
    vision = dict(
        image_size=224,
        patch_size=32,
        num_channels=3,
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=8,
    )
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)
    cfg.architectures = ["CLIPModel"]
    cfg.torch_dtype = torch.float16
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.mul_(0.5 + torch.rand_like(mod.weight))
                mod.bias.add_(0.2 * torch.randn_like(mod.bias))
        for p in [
            model.vision_model.embeddings.class_embedding,
            model.vision_model.embeddings.position_embedding.weight,
            model.text_model.embeddings.position_embedding.weight,
            model.text_model.embeddings.token_embedding.weight,
        ]:
            p.mul_(0.5 / p.std())
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight")):
                p.mul_(ATTN_SCALE)
            elif name.endswith(("fc1.weight", "fc2.weight")):
                p.mul_(MLP_SCALE)
        model.vision_model.embeddings.patch_embedding.weight.mul_(PATCH_SCALE)
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items() if "position_ids" not in k}
    save_torch(sd, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(str(model_dir))
    # Every field, not only the ones that differ from the defaults (the Rust reader needs no defaults).
    cfg.to_json_file(str(model_dir / "config.json"), use_diff=False)

    reloaded = CLIPModel.from_pretrained(str(model_dir), torch_dtype=torch.float64, attn_implementation="eager").eval()
    for k, v in reloaded.state_dict().items():
        if k in sd:
            assert v.dtype == torch.float64 and torch.equal(v, sd[k].double()), k
    assert reloaded.text_model.eos_token_id == 49407
    return reloaded


# ---------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--open-clip-wheel", help="open_clip_torch wheel (default: newest /tmp/openclip/open_clip_torch-*.whl)")
    ap.add_argument("--out", default=str(REPO / "kernels-tests" / "fixtures" / "clip"))
    args = ap.parse_args()
    import PIL
    import tokenizers
    import transformers
    from transformers import CLIPImageProcessor

    torch.set_num_threads(1)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    model_dir, img_dir = out / "model", out / "images"
    model_dir.mkdir(parents=True)
    wheel = find_wheel(args.open_clip_wheel)

    # Tokenizer.
    with tempfile.TemporaryDirectory() as td:
        slow, fast, oc = build_tokenizers(wheel, Path(td))
        save_tokenizer(fast, model_dir)
        ids = token_ids(WORDS, slow, fast, oc, model_dir / "tokenizer.json")
        tids = token_ids([TEMPLATE.format(w) for w in WORDS], slow, fast, oc, model_dir / "tokenizer.json")
    assert max(len(i) for i in ids) == MAX_TOKENS, "the long phrase must truncate"

    # Preprocessor: written, then read back and used.
    CLIPImageProcessor(**PREPROCESSOR).save_pretrained(str(model_dir))
    proc = CLIPImageProcessor.from_pretrained(str(model_dir))

    model = make_model(model_dir)
    names, skipped = write_images(img_dir)

    tensors = {}
    info = {}
    pix = []
    for name in names:
        with Image.open(img_dir / name) as im:
            im.load()
            info[name] = {"width": im.width, "height": im.height, "mode": im.mode, "format": im.format}
            rgb = np.ascontiguousarray(np.asarray(im.convert("RGB")), dtype=np.uint8)
            # What the processor decodes (after convert("RGB"), H x W x 3 bytes): lossy decoders differ.
            info[name]["decoded_rgb_sha256"] = hashlib.sha256(rgb.tobytes()).hexdigest()
            pv = proc(images=im, return_tensors="np")["pixel_values"][0]
        assert pv.shape == (3, 224, 224) and pv.dtype == np.float32, (pv.shape, pv.dtype)
        resized, offset = resize_plan(info[name]["width"], info[name]["height"])
        info[name]["resized_hw"] = resized
        info[name]["crop_top_left"] = offset
        assert np.array_equal(explicit_pixels(rgb, resized, offset), pv), name
        tensors[f"pixel_values.{name}"] = pv
        pix.append(pv)

    with torch.no_grad():
        pv = torch.from_numpy(np.stack(pix)).double()
        img_emb = model.get_image_features(pixel_values=pv)
        vis_pooled = model.vision_model(pixel_values=pv).pooler_output
        assert torch.allclose(model.visual_projection(vis_pooled), img_emb, rtol=0, atol=1e-12)

        def text(all_ids):
            # transformers' _make_causal_mask calls torch.full(..., finfo(float64).min) with the default
            # dtype, which overflows float32: run the text model with float64 as the default dtype.
            torch.set_default_dtype(torch.float64)
            emb, pooled = [], []
            for i in all_ids:
                x = torch.tensor([i], dtype=torch.long)
                emb.append(model.get_text_features(input_ids=x)[0])
                pooled.append(model.text_model(input_ids=x).pooler_output[0])
            torch.set_default_dtype(torch.float32)
            return torch.stack(emb), torch.stack(pooled)

        txt_emb, txt_pooled = text(ids)
        tpl_emb, _ = text(tids)
        cos = torch.nn.functional.normalize(img_emb, dim=-1) @ torch.nn.functional.normalize(txt_emb, dim=-1).T

    top, gaps = {}, []
    for r, name in enumerate(names):
        c = cos[r].tolist()
        order = sorted(range(len(WORDS)), key=lambda j: (-c[j], j))
        top[name] = [[WORDS[j], c[j]] for j in order[:TOP_N]]
        gaps.append(min(c[order[k]] - c[order[k + 1]] for k in range(TOP_N)))

    tensors.update(
        {
            "image_embeds": img_emb.float().numpy(),
            "image_embeds_f64": img_emb.numpy(),
            "vision_pooled": vis_pooled.float().numpy(),
            "text_embeds": txt_emb.float().numpy(),
            "text_embeds_f64": txt_emb.numpy(),
            "text_pooled": txt_pooled.float().numpy(),
            "text_embeds_template": tpl_emb.float().numpy(),
            "text_embeds_template_f64": tpl_emb.numpy(),
            "cosines_f64": cos.numpy(),
        }
    )
    save_file(tensors, str(out / "ref.safetensors"))

    ref = {
        "generator": "tools/make_clip_fixtures.py",
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "tokenizers": tokenizers.__version__,
            "numpy": np.__version__,
            "pillow": PIL.__version__,
        },
        "tokenizer_source": (
            f"OpenAI CLIP bpe_simple_vocab_16e6.txt.gz (sha256 {VOCAB_SHA256}) from the PyPI wheel "
            f"{wheel.name}; vocab.json/merges.txt built as OpenAI SimpleTokenizer; ids checked equal for "
            "transformers CLIPTokenizer (slow, with ftfy), CLIPTokenizerFast, model/tokenizer.json and "
            "open_clip SimpleTokenizer"
        ),
        "max_tokens": MAX_TOKENS,
        "images": names,
        "images_skipped": skipped,
        "image_info": info,
        "words": WORDS,
        "text_ids": ids,
        "template": TEMPLATE,
        "template_ids": tids,
        "top_n": TOP_N,
        "top_words": top,
        "top_words_min_gap": min(gaps),
        "logit_scale": float(model.logit_scale.item()),
        "notes": [
            "pixel_values.NAME: CLIPImageProcessor output (3,224,224) float32 of images/NAME",
            "image_info.NAME.decoded_rgb_sha256: sha256 of Pillow's decoded pixels after convert('RGB'), HxWx3 bytes",
            "image_info.NAME.resized_hw/crop_top_left: the processor's bicubic resize target and crop offsets",
            "image_embeds/vision_pooled rows follow 'images'; text_* rows follow 'words'",
            "text: one sequence at a time, no padding, no attention mask; pooled at the first eos (49407)",
            "float64 model reloaded from model/ (float16 weights); *_f64 keys are float64, others float32",
            "top_words: cosine of L2-normalised image_embeds vs text_embeds (plain '{}'), ties by word index",
        ],
    }
    (out / "ref.json").write_text(json.dumps(ref, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    (out / "README.md").write_text(README, encoding="utf-8")

    # Check that everything loads back.
    back = load_file(str(out / "ref.safetensors"))
    for k, v in sorted(back.items()):
        print(f"  {k:34s} {str(v.dtype):8s} {tuple(v.shape)}")
    w = load_file(str(model_dir / "model.safetensors"))
    assert all(v.dtype == np.float16 for v in w.values())
    print(f"model.safetensors: {len(w)} tensors, {sum(v.size for v in w.values())} parameters")
    print(f"images: {names}, skipped {skipped}")
    for name in names:
        print(f"  {name}: {top[name]}")
    print(f"top-{TOP_N} min cosine gap {min(gaps):.3e}")
    total = 0
    for p in sorted(out.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            print(f"  {p.relative_to(out)}  {p.stat().st_size}")
    print(f"wrote {out} ({total} bytes, {total / 1024 / 1024:.2f} MiB)")


README = """\
# CLIP fixtures

A tiny randomly initialised CLIP (`transformers.CLIPModel`, ViT-B/32 image geometry, text vocabulary
and tokenizer of OpenAI CLIP) and float64 PyTorch references for it.

- `model/`: Hugging Face CLIP folder: `config.json`, `model.safetensors` (float16, HF tensor
  names), `tokenizer.json` (+ `tokenizer_config.json`, `special_tokens_map.json`; OpenAI's
  `bpe_simple_vocab_16e6` BPE, no truncation set: truncate to 77 ids yourself), `preprocessor_config.json`.
- `images/`: generated test images of awkward sizes and modes (RGB, L, RGBA; PNG, JPEG, WebP).
- `ref.safetensors` + `ref.json`: per image `pixel_values.NAME` (CLIPImageProcessor output),
  `image_embeds`, `vision_pooled`; per word `text_ids` (json),
  `text_embeds`, `text_pooled`, `text_embeds_template` ("a photo of {}."), `cosines_f64`
  (images x words) and the 5 nearest words per image (`top_words`). `*_f64` keys are float64,
  the others float32. All references come from the model reloaded from `model/` in float64.

Made by `/tmp/clipfx/bin/python tools/make_clip_fixtures.py` (see its docstring for the
environment: transformers 4.49, torch 2.5.1 CPU, ftfy, the open_clip_torch wheel for the vocabulary).
It is deterministic; rerunning it rewrites this folder.
"""


if __name__ == "__main__":
    main()
