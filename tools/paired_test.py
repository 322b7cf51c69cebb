#!/usr/bin/env python3
"""Paired comparison of two models on the same users, from `msm4sr evaluate --ranks` files.

    python3 tools/paired_test.py A-s1.tsv A-s2.tsv A-s3.tsv -- B-s1.tsv B-s2.tsv B-s3.tsv [--split test]

Each side may list several files (e.g. one per training seed): a user's metric is then averaged over
that side's files first. For Recall@K and NDCG@K (K = 5, 10, 20) it prints the mean of A, of B, the
mean per-user difference A - B with a 95% bootstrap interval over users (10,000 resamples, fixed
seed), and the number of users where A is better / worse. Standard library only.
"""
import argparse
import math
import random
import sys
from collections import defaultdict

KS = (5, 10, 20)


def read_ranks(path, split):
    out = {}
    with open(path) as f:
        header = f.readline().rstrip("\n").split("\t")
        if header != ["split", "user", "target", "rank"]:
            sys.exit(f"{path}: not an `msm4sr evaluate --ranks` file (header {header})")
        for n, line in enumerate(f, start=2):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 4:
                sys.exit(f"{path}:{n}: expected 4 tab-separated fields, got {len(parts)}")
            if parts[0] == split:
                out[parts[1]] = int(parts[3])
    if not out:
        sys.exit(f"{path}: no rows for split '{split}'")
    return out


def per_user(files, split):
    """user -> {metric: value averaged over files}."""
    acc = defaultdict(lambda: defaultdict(float))
    users = None
    for path in files:
        r = read_ranks(path, split)
        if users is not None and set(r) != users:
            sys.exit(f"{path}: a different set of users than {files[0]}")
        users = set(r)
        for u, rank in r.items():
            for k in KS:
                acc[u][f"recall@{k}"] += (rank < k) / len(files)
                acc[u][f"ndcg@{k}"] += (1.0 / math.log2(rank + 2) if rank < k else 0.0) / len(files)
    return acc


def main():
    argv = sys.argv[1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="test", choices=["valid", "test"])
    ap.add_argument("--resamples", type=int, default=10000)
    opts, rest = ap.parse_known_args(argv)
    if rest.count("--") != 1:
        ap.error("give the files of model A, then --, then the files of model B")
    i = rest.index("--")
    a_files, b_files = rest[:i], rest[i + 1:]
    if not a_files or not b_files:
        ap.error("each side needs at least one file")
    a, b = per_user(a_files, opts.split), per_user(b_files, opts.split)
    if set(a) != set(b):
        sys.exit("the two sides rank different users (another dataset or split?)")
    users = sorted(a)
    rng = random.Random(2024)
    n = len(users)
    print(f"{n} users, split {opts.split}; A = {len(a_files)} file(s), B = {len(b_files)} file(s)")
    print("| metric | A | B | A - B | 95% interval | users A better / worse |")
    print("|---|---|---|---|---|---|")
    metrics = [f"recall@{k}" for k in KS] + [f"ndcg@{k}" for k in KS]
    for m in metrics:
        d = [a[u][m] - b[u][m] for u in users]
        mean = sum(d) / n
        boots = sorted(sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(opts.resamples))
        lo, hi = boots[int(0.025 * opts.resamples)], boots[int(0.975 * opts.resamples) - 1]
        better, worse = sum(x > 1e-12 for x in d), sum(x < -1e-12 for x in d)
        ma, mb = sum(a[u][m] for u in users) / n, sum(b[u][m] for u in users) / n
        print(f"| {m} | {ma:.4f} | {mb:.4f} | {mean:+.4f} | [{lo:+.4f}, {hi:+.4f}] | {better} / {worse} |")


if __name__ == "__main__":
    main()
