"""Why a policy's video answers fail: empty answers against kept evidence, and where its memory goes.

Reads ``eval-video`` rows (``rows*.jsonl[.gz]`` of one or more result folders) and the annotations they
were run on, and prints per policy: accuracy, how many answers were empty or unparseable (the model
stopped at once), the share of the answer frames' tokens kept in right and in wrong answers, and the
mean retention of the first 8, middle and last 8 frames.

    python benchmarks/scripts/video_failures.py --annotations runs/video_qa_128/test.jsonl \\
        --rows benchmarks/results/video_128_namm_joint/videostats_ema9999 benchmarks/results/video_128 \\
        --policies "NAMM @ 15% one-shot" "NAMM @ 15%" "TOVA @ 15% one-shot" "H2O @ 15% one-shot"
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np

from namm_transfer.pipelines.video.evaluate import key_frame_retention


def read_rows(folders: list[str]) -> dict[str, dict[str, dict]]:
    """``{policy: {sample_id: row}}`` from every ``rows*.jsonl[.gz]`` (the first row of a pair wins)."""
    out: dict[str, dict[str, dict]] = {}
    for folder in folders:
        for path in sorted(Path(folder).glob("rows*.jsonl*")):
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt") as f:
                for line in f:
                    row = json.loads(line)
                    out.setdefault(row["policy"], {}).setdefault(row["sample_id"], row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotations", required=True)
    parser.add_argument("--rows", nargs="+", required=True, help="eval-video output folders")
    parser.add_argument("--policies", nargs="+", required=True)
    args = parser.parse_args()
    with open(args.annotations) as f:  # make-video-qa's records: indices of the answer frames
        key_frames = {a["id"]: [int(k) for k in a["key_frames"]] for a in map(json.loads, f)}
    rows = read_rows(args.rows)
    print("| policy | accuracy | empty / unparsed answers | answer frames kept: right / wrong answers "
          "| first 8 / middle / last 8 frames kept |")
    print("|---|---|---|---|---|")
    for policy in args.policies:
        samples = list(rows.get(policy, {}).values())
        if not samples:
            raise SystemExit(f"no rows of {policy!r} in {args.rows}")
        right = [r for r in samples if r["correct"]]
        wrong = [r for r in samples if not r["correct"]]
        frames = np.mean([np.asarray(r["frame_retention"], dtype=float) for r in samples], axis=0)
        unparsed = sum(row["predicted"] is None for row in samples)
        empty = sum(row["predicted"] is None and not row["output"].strip() for row in samples)
        kept = " / ".join(f"{key_frame_retention(rs, key_frames)[0]:.2f}" if rs else "-"
                          for rs in (right, wrong))
        print(f"| {policy} | {np.mean([r['correct'] for r in samples]):.3f} (n={len(samples)}) | "
              f"{empty} / {unparsed} | {kept} | {frames[:8].mean():.2f} / {frames[8:-8].mean():.3f} / "
              f"{frames[-8:].mean():.2f} |")


if __name__ == "__main__":
    main()
