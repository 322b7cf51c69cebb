#!/usr/bin/env python3
"""Summarise `msm4sr train --json` outputs as a Markdown table (mean +- std over seeds).

    python3 tools/results_table.py runs/exp/synth-sasrec-s*.json -- runs/exp/synth-msm4sr-s*.json -- ...
Groups are separated by `--`; each group is one row, named after its first file's "model" field
(or `name=` given as the first item of a group).
"""
import json
import statistics
import sys

KEYS = ["recall@5", "recall@10", "recall@20", "ndcg@5", "ndcg@10", "ndcg@20"]


def groups(argv):
    cur = []
    for a in argv:
        if a == "--":
            if cur:
                yield cur
            cur = []
        else:
            cur.append(a)
    if cur:
        yield cur


def main():
    print("| model | runs | " + " | ".join(f"test {k}" for k in KEYS) + " | epochs | seconds |")
    print("|---|---|" + "---|" * (len(KEYS) + 2))
    for g in groups(sys.argv[1:]):
        name = None
        if g[0].startswith("name="):
            name, g = g[0][5:], g[1:]
        runs = [json.load(open(f)) for f in g]
        name = name or runs[0]["model"]
        cells = []
        for k in KEYS:
            v = [r["test"][k] for r in runs]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{statistics.mean(v):.4f} ± {sd:.4f}" if len(v) > 1 else f"{v[0]:.4f}")
        ep = statistics.mean(r["epochs"] for r in runs)
        sec = statistics.mean(r["seconds"] for r in runs)
        print(f"| {name} | {len(runs)} | " + " | ".join(cells) + f" | {ep:.0f} | {sec:.0f} |")


if __name__ == "__main__":
    main()
