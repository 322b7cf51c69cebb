"""Summarise experiments/office/fidelity.sh: per seed and mean over seeds, the authors' code and
msm4sr side by side (validation Recall@20 per epoch, test metrics, ratio msm4sr / authors).

usage: python3 fidelity_summary.py OUT SEED...   -> OUT/fidelity.md (also printed)
Reads the logs ../shared/peers/mp4sr/fidelity.sh left in OUT/seed<S>/logs.
"""
import json
import re
import statistics
import sys

ANSI = re.compile(r"\x1b\[[0-9;]*m")
PAIR = re.compile(r"([a-z]+@\d+)'?\s*[:,]\s*([0-9.]+)")
COLS = ["recall@5", "recall@10", "recall@20", "ndcg@5", "ndcg@10", "ndcg@20"]


def authors(logs, tag):
    t = ANSI.sub("", open(f"{logs}/{tag}.authors.log").read())
    curve = [float(x) for x in re.findall(r"valid result: *\n[^\n]*?recall@20 : ([0-9.]+)", t)]
    test = next((dict((k, float(v)) for k, v in PAIR.findall(l)) for l in t.splitlines() if "test result" in l), {})
    return curve, test


def ours(logs, tag):
    e = open(f"{logs}/{tag}.ours.err").read()
    curve = [float(x) for x in re.findall(r"valid recall@20 ([0-9.]+)", e)]
    s = open(f"{logs}/{tag}.ours.json").read()
    return curve, json.loads(s[s.index("{"):])["test"]


def mean_sd(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main():
    out, seeds = sys.argv[1], sys.argv[2:]
    runs = {}
    for s in seeds:
        logs = f"{out}/seed{s}/logs"
        pre_a, _ = authors(logs, "pretrain")
        ft_a = authors(logs, "msm4sr")
        runs[s] = {
            "SASRec": (authors(logs, "sasrec"), ours(logs, "sasrec")),
            "MSM4SR": ((pre_a + ft_a[0], ft_a[1]), ours(logs, "msm4sr")),
        }
    what = "mean ± sample standard deviation over seeds" if len(seeds) > 1 else "one seed"
    lines = [f"Seeds: {', '.join(seeds)}. Test metrics, {what}.", ""]
    lines.append("| model | program | " + " | ".join("test " + c for c in COLS) + " |")
    lines.append("|---|---|" + "---|" * len(COLS))
    ratios = []
    for model in ("SASRec", "MSM4SR"):
        means = {}
        for k, prog in ((0, "authors' code"), (1, "msm4sr")):
            cells = []
            for c in COLS:
                m, sd = mean_sd([runs[s][model][k][1][c] for s in seeds])
                means[(k, c)] = m
                cells.append(f"{m:.4f} ± {sd:.4f}" if len(seeds) > 1 else f"{m:.4f}")
            lines.append(f"| {model} | {prog} | " + " | ".join(cells) + " |")
        ratios.append((model, means[(1, "recall@20")] / means[(0, "recall@20")], means[(1, "ndcg@20")] / means[(0, "ndcg@20")]))
    lines.append("")
    lines.append("| model | msm4sr / authors, test Recall@20 (mean over seeds) | NDCG@20 |")
    lines.append("|---|---|---|")
    for model, r, n in ratios:
        lines.append(f"| {model} | ×{r:.3f} | ×{n:.3f} |")
    lines.append("")
    lines.append("Per seed, test Recall@20 / NDCG@20 (authors' code → msm4sr):")
    lines.append("")
    for s in seeds:
        parts = []
        for model in ("SASRec", "MSM4SR"):
            a, o = runs[s][model][0][1], runs[s][model][1][1]
            parts.append(f"{model} {a['recall@20']:.4f} → {o['recall@20']:.4f} / {a['ndcg@20']:.4f} → {o['ndcg@20']:.4f}")
        lines.append(f"- seed {s}: " + "; ".join(parts))
    lines.append("")
    lines.append("Validation Recall@20 per epoch, mean over seeds (MSM4SR: the pre-training epochs, scored with the")
    lines.append("modality encoders alone, then fine-tuning; msm4sr's curve is the same sequence):")
    lines.append("")
    for model in ("SASRec", "MSM4SR"):
        for k, prog in ((0, "authors' code"), (1, "msm4sr")):
            curves = [runs[s][model][k][0] for s in seeds]
            n = min(len(c) for c in curves)
            lines.append(f"- {model}, {prog}: " + " ".join(f"{statistics.mean(c[e] for c in curves):.4f}" for e in range(n)))
    text = "\n".join(lines) + "\n"
    open(f"{out}/fidelity.md", "w").write(text)
    print(text)


if __name__ == "__main__":
    main()
