"""Diagnostic, not a zero-shot policy: the NAMM's read-out fitted on the video model's own attention.

Every read-out of ``benchmarks/results/video_128_linear/`` was learned on text and carried to video
zero-shot; none beats SnapKV one-shot at 15% of the video tokens, and the best single bin set by hand only
ties it. This asks whether the NAMM's features can beat it at all: the same shared linear read-out, fitted
the same way (``joint_readouts.py fit-heads --shared``: Adam, listwise, towards each head's top 10% of the
context), but on videos, towards the attention the question and the answer pay to each token of the
prompt up to the video's end (the one-shot eviction point). That is adaptation to the task (it reads
answers), so the fitted NAMM is an upper bound of the feature space, never a candidate for the zero-shot
targets. The videos are a training split (``make-video-qa --train``), disjoint from the validation and
test questions it is evaluated on.

``pool``: runs the video model over the videos with ``--features``' NAMM (its feature config and video
statistics) recording its spectrogram, and writes the pool in ``fit-heads --cache``'s format. ``fit``: the
shared read-out on a pool, saved as a per-head linear NAMM with ``--features``' statistics.

    python benchmarks/scripts/video_readout_fit.py pool --annotations runs/video_qa_128_train96/train.jsonl \\
        --cache runs/pools/video_train96_ema0.9999.pt
    python benchmarks/scripts/video_readout_fit.py fit --cache runs/pools/video_train96_ema0.9999.pt \\
        --save-namm runs/video_fit/namm --recent-tokens 61
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch
from joint_readouts import fit_shared_readout

from namm_transfer import NAMM

SHIPPED = "benchmarks/results/video_128_linear/namm_videostats"  # the shipped NAMM with video statistics
VIDEO_MODEL, FRAMES = "smollm2-shapes-128", 128


@torch.no_grad()
def video_pool(annotations: str, features: str, limit: int | None) -> dict:
    """``fit-heads --cache``'s pool of the videos of ``annotations``: per video, ``features``' NAMM's
    features of every prompt token up to the video's end (z-scored by its video statistics), the attention
    the question and reference answer paid to each of them per layer-head, validity and positions."""
    from tqdm.auto import tqdm

    from namm_transfer.adapters import attach, video_layout
    from namm_transfer.pipelines.text.evolve_shared import answer_attention, cache_features
    from namm_transfer.pipelines.text.shared_prefill import prefill_context
    from namm_transfer.pipelines.video.annotations import load_annotations
    from namm_transfer.pipelines.video.evaluate import prompt_ids, video_end
    from namm_transfer.pipelines.video.io import read_frames
    from namm_transfer.pipelines.video.loading import load_video_model
    from namm_transfer.pipelines.video.qa import POST_PROMPT

    probe = NAMM.from_pretrained(features)
    if probe.norm_mean is None:
        raise SystemExit(f"{features} holds no feature statistics: run namm-transfer video-stats on it first")
    video_model = load_video_model(VIDEO_MODEL, None, "cpu", torch.float32)
    model, tokenizer = video_model.model, video_model.tokenizer
    layout = video_layout(model)
    samples = load_annotations(annotations, None, "auto")[:limit]
    pool, exact, evidence = [], [], []
    with attach(model, probe) as handle:
        for sample in tqdm(samples, desc="video pool", unit="video"):
            frames = read_frames(sample.video_path, num_frames=FRAMES)
            pixels = video_model.preprocessor(frames)[None].to(dtype=model.dtype)
            ids = prompt_ids(video_model, sample, FRAMES, POST_PROMPT, "")
            end = video_end(ids, layout.video_token_id)
            prefill = prefill_context(model, handle, SimpleNamespace(prompt_ids=ids), tokenizer, [probe],
                                      context_len=end, inputs={"pixel_values_videos": pixels})
            answer = torch.tensor(tokenizer.encode(" " + sample.answer, add_special_tokens=False))
            full, target = answer_attention(model, prefill, answer)  # question and answer, per layer-head
            feats, valid, positions = cache_features(prefill.cache, probe, 0)
            pool.append((feats, target, valid, positions))
            exact.append(bool(full.exact[0]))
            evidence.append(key_frame_mask(ids[:end], layout, sample.meta["key_frames"]))
    print(f"the full cache answers {sum(exact)} of {len(exact)} videos (teacher-forced)", flush=True)
    return {"exact": exact, "evidence": evidence, "pool": pool, "config": asdict(probe.config),
            "mean": probe.norm_mean, "var": probe.norm_var,
            "with_age": True, "future": None, "tasks": ["video"], "model": VIDEO_MODEL,
            "annotations": annotations, "features": features}


def key_frame_mask(ids: list[int], layout, key_frames: list[int]) -> torch.Tensor:
    """``[len(ids)]`` bool: the positions of the answer frames' tokens (``key_frames``: indices of the
    sampled frames that show what the question asks)."""
    from namm_transfer.adapters import frame_map

    return torch.isin(frame_map(torch.tensor(ids), layout)[0], torch.tensor(key_frames))


def evidence_targets(saved: dict) -> list:
    """The pool with each layer-head's target the answer frames' tokens (bool, every one alike): the fit
    learns to rank exactly them first, whatever the question's attention says (``readout_loss``)."""
    return [(x, mask[p.clamp_min(0)] & v, v, p)
            for (x, _, v, p), mask in zip(saved["pool"], saved["evidence"], strict=True)]


def make_pool(args) -> None:
    torch.set_num_threads(1)
    saved = video_pool(args.annotations, args.features, args.limit)
    Path(args.cache).parent.mkdir(parents=True, exist_ok=True)
    torch.save(saved, args.cache)
    print(f"wrote {args.cache}: {len(saved['pool'])} videos", flush=True)


def fit(args) -> None:
    torch.set_num_threads(1)
    saved = torch.load(args.cache)
    if saved.get("tasks") != ["video"]:
        raise SystemExit(f"{args.cache} is not a video pool (tasks {saved.get('tasks')}): "
                         "write one with pool")
    # fit-heads' settings this fit does not vary: one read-out for every layer-head, spectral bins only
    if args.target == "evidence":
        if "evidence" not in saved:
            raise SystemExit(f"{args.cache} holds no answer frames: write it again with pool")
        saved = {**saved, "pool": evidence_targets(saved), "target": "evidence"}
    settings = SimpleNamespace(shared=True, with_age=False, nonneg=False, score_pool=1, **vars(args))
    fit_shared_readout(saved, settings, Path(args.cache))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_pool = sub.add_parser("pool", help="the video model's features and question-and-answer targets")
    p_pool.add_argument("--annotations", required=True, help="a training split's videos (make-video-qa)")
    p_pool.add_argument("--features", default=SHIPPED, help="the NAMM whose features and statistics are read")
    p_pool.add_argument("--limit", type=int, default=None, help="read at most this many videos")
    p_pool.add_argument("--cache", required=True, help="the pool file written")
    p_fit = sub.add_parser("fit", help="fit the shared read-out on a video pool and save the NAMM")
    p_fit.add_argument("--cache", required=True, help="a pool written by pool")
    p_fit.add_argument("--steps", type=int, default=6000, help="Adam steps (fit-heads' recipe)")
    p_fit.add_argument("--lr", type=float, default=0.01)
    p_fit.add_argument("--target", default="question", choices=("question", "evidence"),
                       help="question: the tokens the question and answer attend to in each head; evidence: "
                            "the answer frames' tokens (an oracle of what to keep)")
    p_fit.add_argument("--exclude-recent", type=int, default=64,
                       help="W: the last W positions before the video's end left out (a window keeps them)")
    p_fit.add_argument("--recent-tokens", type=int, default=61, help="the saved NAMM's recent window")
    p_fit.add_argument("--name", default="video_fit", help="writes OUT_DIR/NAME.pt and NAME.json")
    p_fit.add_argument("--out-dir", default="runs/video_fit")
    p_fit.add_argument("--save-namm", required=True, help="the NAMM's directory (with training.json)")
    args = parser.parse_args()
    {"pool": make_pool, "fit": fit}[args.command](args)


if __name__ == "__main__":
    main()
