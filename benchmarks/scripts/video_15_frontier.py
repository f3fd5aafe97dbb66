"""Every read-out tried at 15% of the video tokens, progressive against one-shot, beside the baselines.

Reads the committed per-question rows of `benchmarks/results/video_128_linear/` (and the baselines'
runs under `video_128_namm_joint/head_mix/`), recomputes each accuracy and its standard error, and
draws one point per read-out: x = 15% progressive, y = 15% one-shot. Issue 14 asks for a NAMM above
every baseline at 15%, i.e. a point in the top-right box the best baseline of each protocol leaves.

    python benchmarks/scripts/video_15_frontier.py        # writes frontier_15.png and frontier_15.md

Validation panel: the 216 validation questions, every read-out (text-fitted and zero-shot; fitted or
evolved on video, which reads answers and is only a diagnostic; set by hand). The validation runs hold
H2O progressive and SnapKV / TOVA one-shot, the strongest baselines of each protocol on test. Test
panel: the 216 test questions, the shipped NAMM, the video-evolved read-out and every baseline.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from video_failures import read_rows

from namm_transfer.pipelines.harness import mean_se

RESULTS = Path(__file__).resolve().parents[1] / "results"
LINEAR = RESULTS / "video_128_linear"
VAL = LINEAR / "val216"
JOINT = RESULTS / "video_128_namm_joint" / "head_mix"

PROG, ONE_SHOT = "NAMM @ 15%", "NAMM @ 15% one-shot"

# (label, kind, progressive run, one-shot run); kind: "text" (zero-shot), "video" (adapted), "hand".
VALIDATION: list[tuple[str, str, str, str]] = [
    ("shipped linear NAMM (EMA 0.9999, window 61)", "text", "linear_15", "linear_os15_diag"),
    ("EMA 0.99", "text", "linear_ema0.99", "linear_ema0.99"),
    ("EMA 0.999", "text", "linear_ema0.999", "linear_ema0.999"),
    ("EMA 0.99999", "text", "linear_ema0.99999", "linear_ema0.99999_os15"),
    ("age weights fitted", "text", "linear_age_15", "linear_age_os15"),
    ("mean features", "text", "linear_unbiased_15", "linear_unbiased_os15"),
    ("hop / vartrack / alias pool", "text", "linear_hva_15", "linear_hva_os15"),
    ("scores pooled (5)", "text", "pool5_linear_15", "pool5_linear_os15"),
    ("fitted on pooled scores", "text", "linear_pool5_15", "linear_pool5_os15"),
    ("one cap per layer", "text", "shared_heads_15", "shared_heads_os15"),
    ("Gemma-3-270M's attention", "text", "gemma_15", "gemma_os15"),
    ("BAM, 300 steps", "text", "bam300_15", "bam300_os15"),
    ("BAM, 3,000 steps", "text", "bam3000_15", "bam3000_os15"),
    ("video: question attention (0.9999, 61)", "video", "videofit_question_ema0.9999_w61_15",
     "videofit_question_ema0.9999_w61_os15"),
    ("video: answer frames (0.9999, 61)", "video", "videofit_frames_ema0.9999_w61_15",
     "videofit_frames_ema0.9999_w61_os15"),
    ("video: question attention (0.97, 32)", "video", "videofit_question_ema0.97_w32_15",
     "videofit_question_ema0.97_w32_os15"),
    ("video: answer frames (0.97, 32)", "video", "videofit_frames_ema0.97_w32_15",
     "videofit_frames_ema0.97_w32_os15"),
    ("video: CMA-ES on answers (0.97, 32)", "video", "videoevo_ema0.97_w32_15", "videoevo_ema0.97_w32_os15"),
    ("bin 0 (EMA 0.9999, window 61)", "hand", "bin0_m100_w61", "bin0_m100_w61_os15"),
    ("bin 0 (EMA 0.97, window 32)", "hand", "bin0_ema0.97_w32_15", "bin0_ema0.97_w32_os15"),
    ("bin 0 (EMA 0.99, window 32)", "hand", "bin0_ema0.99_w32_15", "bin0_ema0.99_w32_os15"),
    ("bin 0 of the mean", "hand", "bin0_unbiased_15", "bin0_unbiased_os15"),
    ("bin 0 (0.97, 32), pooled", "hand", "pool5_bin0_ema0.97_w32_15", "pool5_bin0_ema0.97_w32_os15"),
]
VALIDATION_BASELINES = {  # policy -> its run, one protocol each
    "H2O @ 15%": JOINT / "val216" / "base",
    "SnapKV @ 15% one-shot": VAL / "baselines_os15",
    "TOVA @ 15% one-shot": VAL / "baselines_os15",
}
TEST = [
    ("shipped linear NAMM", "text", LINEAR / "test216", LINEAR / "test216"),
    ("video: CMA-ES on answers", "video", LINEAR / "test216_videoevo_progressive",
     LINEAR / "test216_videoevo_one-shot"),
]
TEST_BASELINE_RUNS = [JOINT / "test216", JOINT / "test216_budgets", LINEAR / "test216_weak15"]
TEST_BASELINES = ["H2O", "SnapKV", "TOVA", "Recency", "L2Norm", "RandomEviction"]
STYLE = {"text": ("o", "tab:blue", "fitted on text (zero-shot)"),
         "video": ("^", "tab:orange", "fitted on video answers/attention (adapted)"),
         "hand": ("s", "tab:gray", "set by hand"),
         "base": ("*", "black", "baseline")}


@dataclass(frozen=True)
class Accuracy:
    mean: float
    se: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.se:.3f}"


@cache  # a run holding several policies is read once
def run_rows(run: Path) -> dict[str, dict[str, dict]]:
    """``{policy: {sample_id: row}}`` of one eval-video output folder (video_failures' reader)."""
    if not any(run.glob("rows*.jsonl*")):
        raise FileNotFoundError(f"no rows.jsonl(.gz) in {run}")
    return read_rows([str(run)])


def accuracy(run: Path, policy: str) -> Accuracy:
    """Share correct over the run's answered rows of `policy`, as eval-video's summary computes it."""
    rows = run_rows(run).get(policy, {}).values()
    correct = [float(r["correct"]) for r in rows if not r.get("failed")]
    if not correct:
        raise ValueError(f"{run} has no answered rows of policy {policy!r}")
    return Accuracy(*mean_se(correct), len(correct))


def collect() -> dict[str, list[tuple[str, str, Accuracy, Accuracy]]]:
    """Per panel: (label, kind, 15% progressive, 15% one-shot)."""
    val = [(label, kind, accuracy(VAL / prog, PROG), accuracy(VAL / one, ONE_SHOT))
           for label, kind, prog, one in VALIDATION]
    test = [(label, kind, accuracy(prog, PROG), accuracy(one, ONE_SHOT)) for label, kind, prog, one in TEST]
    for name in TEST_BASELINES:
        found = {}
        for run in TEST_BASELINE_RUNS:
            for protocol, policy in (("prog", f"{name} @ 15%"), ("one", f"{name} @ 15% one-shot")):
                if policy in run_rows(run):
                    found[protocol] = accuracy(run, policy)
        if len(found) < 2:
            raise ValueError(f"{name} @ 15% is missing a protocol in {[str(r) for r in TEST_BASELINE_RUNS]}")
        test.append((name, "base", found["prog"], found["one"]))
    return {"validation": val, "test": test}


def best_baselines(panels: dict, val_base: dict[str, Accuracy]) -> dict[str, tuple[float, float]]:
    """Per panel, the best baseline's accuracy in each protocol: (progressive, one-shot)."""
    test = [(p.mean, o.mean) for _, kind, p, o in panels["test"] if kind == "base"]
    val = {one_shot: max(a.mean for policy, a in val_base.items() if policy.endswith("one-shot") == one_shot)
           for one_shot in (False, True)}  # the validation runs hold each baseline in one protocol
    return {"validation": (val[False], val[True]), "test": (max(p for p, _ in test), max(o for _, o in test))}


def markdown(panels: dict, val_base: dict[str, Accuracy], best: dict[str, tuple[float, float]]) -> str:
    out = ["# 15% of the video tokens: progressive against one-shot, every read-out tried", "",
           "Written by `python benchmarks/scripts/video_15_frontier.py` from the committed rows; accuracy",
           "± s.e. over 216 questions. Above both: above the best baseline of each protocol in that",
           "split.", ""]
    for split, rows in panels.items():
        bp, bo = best[split]
        out += [f"## {split.capitalize()} (best baseline: {bp:.3f} progressive, {bo:.3f} one-shot)", "",
                "| read-out | kind | 15% progressive | 15% one-shot | above both |", "|---|---|---|---|---|"]
        for label, kind, prog, one in sorted(rows, key=lambda r: -(r[2].mean + r[3].mean)):
            above = "-" if kind == "base" else ("yes" if prog.mean > bp and one.mean > bo else "no")
            out.append(f"| {label} | {STYLE[kind][2]} | {prog} | {one} | {above} |")
        if split == "validation":
            out.append("| " + ", ".join(f"{k} {v}" for k, v in val_base.items()) + " | baseline | | | - |")
        out.append("")
    return "\n".join(out)


def plot(panels: dict, best: dict[str, tuple[float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 6))
    for ax, (split, rows) in zip(axes, panels.items(), strict=True):
        seen, labels = set(), {}
        for label, kind, prog, one in rows:
            marker, colour, legend = STYLE[kind]
            ax.errorbar(prog.mean, one.mean, xerr=prog.se, yerr=one.se, fmt=marker, color=colour,
                        ms=10 if kind == "base" else 6, alpha=0.8, elinewidth=0.6,
                        label=None if kind in seen else legend)
            seen.add(kind)
            if (split == "test" and prog.mean > 0.85) or one.mean > 0.9:  # the crowded corner is labelled
                labels.setdefault((prog.mean, one.mean, kind == "base"), []).append(label)  # one per spot
        for (x, y, base), names in labels.items():  # baselines' labels below left, the others' above right
            ax.annotate(" = ".join(names), (x, y), fontsize=7, xytext=(-4, -10) if base else (4, 3),
                        textcoords="offset points", ha="right" if base else "left")
        bp, bo = best[split]
        ax.axvline(bp, color="black", lw=0.8, ls="--")
        ax.axhline(bo, color="black", lw=0.8, ls="--")
        ax.fill_between([bp, 1.0], bo, 1.0, color="tab:green", alpha=0.08,
                        label="above the best baseline of both protocols")
        ax.set_xlim(0.85, 0.99)
        ax.set_ylim(0.74, 0.97)
        ax.set_xlabel("accuracy, 15% progressive")
        ax.set_ylabel("accuracy, 15% one-shot")
        off = "BAM, fitted age weights" if split == "validation" else "Recency, L2Norm, Random"
        ax.set_title(f"{split}: 216 questions ({off}: off the axes)", fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("LLaVA-NeXT-Video (smollm2-shapes-128), 512 video tokens, 15% kept")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=LINEAR, help="where frontier_15.{png,md} go")
    args = parser.parse_args()
    panels = collect()
    val_base = {policy: accuracy(run, policy) for policy, run in VALIDATION_BASELINES.items()}
    best = best_baselines(panels, val_base)
    text = markdown(panels, val_base, best)
    (args.out_dir / "frontier_15.md").write_text(text + "\n")
    plot(panels, best, args.out_dir / "frontier_15.png")
    print(text)


if __name__ == "__main__":
    main()
