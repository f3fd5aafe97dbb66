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
shared read-out on a pool, saved as a per-head linear NAMM with ``--features``' statistics; ``--target
evidence`` fits it towards the answer frames' tokens instead of the question's attention. ``evolve``: no
proxy at all: separable CMA-ES over the read-out's 17 spectral weights, each member scored by the answers
it leaves the model (one-shot eviction at the budget, then the reference answer teacher-forced), as the
text evolution scores its members; resumable.

    python benchmarks/scripts/video_readout_fit.py pool --annotations runs/video_qa_128_train96/train.jsonl \\
        --cache runs/pools/video_train96_ema0.9999.pt
    python benchmarks/scripts/video_readout_fit.py fit --cache runs/pools/video_train96_ema0.9999.pt \\
        --save-namm runs/video_fit/namm --recent-tokens 61
    python benchmarks/scripts/video_readout_fit.py evolve \\
        --annotations runs/video_qa_128_train96/train.jsonl \\
        --limit 48 --features runs/linear_ema0.97/namm_videostats --out-dir runs/video_evolve
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch
from joint_readouts import fit_shared_readout

from namm_transfer import NAMM

SHIPPED = "benchmarks/results/video_128_linear/namm_videostats"  # the shipped NAMM with video statistics
VIDEO_MODEL, FRAMES = "smollm2-shapes-128", 128


def video_setup(features: str):
    """``(probe, video_model)``: ``features``' NAMM (its feature config and video statistics) and the
    shipped video model."""
    from namm_transfer.pipelines.video.loading import load_video_model

    probe = NAMM.from_pretrained(features)
    if probe.norm_mean is None:
        raise SystemExit(f"{features} holds no feature statistics: run namm-transfer video-stats on it first")
    return probe, load_video_model(VIDEO_MODEL, None, "cpu", torch.float32)


@torch.no_grad()
def video_entries(annotations: str, probe: NAMM, video_model, limit: int | None):
    """Per video of ``annotations``, a text pool's entry (``PoolEntry``): the prompt prefilled up to the
    video's end (the one-shot point) with ``probe`` recording its spectrogram, the full cache's
    teacher-forced answer, the attention the question and reference answer paid to each prompt token per
    layer-head (``target``) and the answer frames' positions (``evidence``). A generator: one prefill
    held at a time unless the caller keeps them."""
    from tqdm.auto import tqdm

    from namm_transfer.adapters import attach, video_layout
    from namm_transfer.pipelines.text.evolve_shared import PoolEntry, answer_attention
    from namm_transfer.pipelines.text.shared_prefill import answer_token_ids, prefill_context
    from namm_transfer.pipelines.video.annotations import load_annotations
    from namm_transfer.pipelines.video.evaluate import prompt_ids, video_end
    from namm_transfer.pipelines.video.io import read_frames
    from namm_transfer.pipelines.video.qa import POST_PROMPT

    model, tokenizer = video_model.model, video_model.tokenizer
    layout = video_layout(model)
    samples = load_annotations(annotations, None, "auto")[:limit]
    with attach(model, probe) as handle:
        for i, sample in enumerate(tqdm(samples, desc="video prefills", unit="video")):
            frames = read_frames(sample.video_path, num_frames=FRAMES)
            pixels = video_model.preprocessor(frames)[None].to(dtype=model.dtype)
            ids = prompt_ids(video_model, sample, FRAMES, POST_PROMPT, "")
            end = video_end(ids, layout.video_token_id)
            prefill = prefill_context(model, handle, SimpleNamespace(prompt_ids=ids), tokenizer, [probe],
                                      context_len=end, inputs={"pixel_values_videos": pixels})
            answer = answer_token_ids(tokenizer, sample)  # " B", as the model writes it
            full, target = answer_attention(model, prefill, answer)
            evidence = key_frame_mask(ids[:end], layout, sample.meta["key_frames"])
            yield PoolEntry("video", i, prefill, answer, full, target, evidence)


def video_pool(annotations: str, features: str, limit: int | None) -> dict:
    """``fit-heads --cache``'s pool of the videos of ``annotations`` (:func:`video_entries`): per video,
    the probe's features of every prompt token up to the video's end (z-scored by its video statistics),
    the question's attention target, validity and positions; and the answer frames' positions."""
    from namm_transfer.pipelines.text.evolve_shared import entry_features

    probe, video_model = video_setup(features)
    pool, exact, evidence = [], [], []
    for entry in video_entries(annotations, probe, video_model, limit):
        feats, valid, positions = entry_features(entry, probe)  # as fit-heads reads a text pool
        pool.append((feats, entry.target, valid, positions))
        exact.append(bool(entry.full.exact[0]))
        evidence.append(entry.evidence)
    print(f"the full cache answers {sum(exact)} of {len(exact)} videos (teacher-forced)", flush=True)
    return {"exact": exact, "evidence": evidence, "pool": pool, "config": asdict(probe.config),
            "mean": probe.norm_mean, "var": probe.norm_var, "with_age": True, "future": None,
            "tasks": ["video"], "model": VIDEO_MODEL, "annotations": annotations, "features": features}


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
    if args.target == "evidence":
        if "evidence" not in saved:
            raise SystemExit(f"{args.cache} holds no answer frames: write it again with pool")
        saved = {**saved, "pool": evidence_targets(saved), "target": "evidence"}
    # fit-heads' settings this fit does not vary: one read-out for every layer-head, spectral bins only
    settings = SimpleNamespace(shared=True, with_age=False, nonneg=False, score_pool=1, **vars(args))
    fit_shared_readout(saved, settings, Path(args.cache))


def one_shot_fraction(entry, budget: float, video_tokens: int) -> float:
    """The share of ``entry``'s prefill that ``eval-video``'s one-shot cap keeps: ``budget`` of the
    ``video_tokens`` plus every text token before the video's end (``capped_policy``), as a share
    ``member_scores`` turns back into exactly that many tokens."""
    from namm_transfer.pipelines.video.evaluate import video_cap

    context = entry.prefill.context_len
    return video_cap(budget, video_tokens, context - video_tokens) / context


def run_generations(state: dict, fitness, population: int, generations: int, save=lambda: None) -> None:
    """CMA-ES generations until ``state["generation"]`` reaches ``generations``: each asks ``population``
    members, scores them and the mean they were drawn around in one call (``fitness``: ``[rows, dim]`` ->
    ``(score, exact)`` per row, higher is better), tells the optimizer, logs the mean's score, and keeps in
    ``state["best"]`` the best-scored mean with that score; ``save()`` after every generation."""
    import numpy as np

    opt = state["optimizer"]
    while state["generation"] < generations:
        members = [opt.ask() for _ in range(population)]
        centre = opt.mean.copy()  # the mean these members were drawn around, scored with them
        score, exact = fitness(np.stack(members + [centre]))  # last row: the CMA mean
        opt.tell([(x, -float(f)) for x, f in zip(members, score[:-1], strict=True)])
        state["generation"] += 1
        g = state["generation"]
        state["log"].append({"generation": g, "mean_score": float(score[-1]), "mean_exact": float(exact[-1]),
                             "members_best": float(score[:-1].max()), "sigma": opt.sigma})
        if score[-1] > state["best"][0]:
            state["best"] = (float(score[-1]), centre, g)
        save()
        print(f"generation {g}: CMA mean score {score[-1]:.4f}, exact {exact[-1]:.3f}; best member "
              f"{score[:-1].max():.4f}; sigma {opt.sigma:.3f}", flush=True)


def evolve(args) -> None:
    """Separable CMA-ES over the read-out's spectral weights, scored by the answers themselves: every
    member's one-shot eviction at ``--budget`` on every training video, then the reference answer
    teacher-forced (``evolve_shared.member_scores``: exact match and likelihood against the full cache's,
    ``--em-weight`` between them). Resumes from ``OUT_DIR/state.pkl``."""
    import pickle

    import numpy as np
    from joint_readouts import ranking_config, save_fitted_namm

    from namm_transfer.adapters import video_layout
    from namm_transfer.pipelines.common import run_metadata
    from namm_transfer.pipelines.text.cma import ResumableSepCMA
    from namm_transfer.pipelines.text.evolve_shared import member_scores

    torch.set_num_threads(1)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    probe, video_model = video_setup(args.features)
    config = ranking_config({"config": asdict(probe.config)}, "linear", args.recent_tokens)
    age, bins = config.age_dim, config.n_bins
    norm = (probe.norm_mean.numpy(), probe.norm_var.numpy())
    entries = list(video_entries(args.annotations, probe, video_model, args.limit))
    video_tokens = video_layout(video_model.model).video_tokens(FRAMES)
    fractions = [one_shot_fraction(e, args.budget, video_tokens) for e in entries]

    def decode(theta: np.ndarray) -> np.ndarray:  # spectral weights -> parameters (no age weights, no bias)
        theta = np.atleast_2d(theta)
        return np.concatenate([np.zeros((len(theta), age)), theta, np.zeros((len(theta), 1))], axis=1)

    def fitness(params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # per member: mean score, exact share
        scored = [member_scores(video_model.model, e, config, params, f, norm, args.block, args.em_weight)
                  for e, f in zip(entries, fractions, strict=True)]
        return (np.mean([s for s, _, _ in scored], axis=0), np.mean([x for _, x, _ in scored], axis=0))

    state_path = out / "state.pkl"
    if state_path.exists():
        state = pickle.loads(state_path.read_bytes())
        print(f"resuming at generation {state['generation']}", flush=True)
    else:
        start = np.zeros(bins)
        if args.start is not None:
            start = NAMM.from_pretrained(args.start).params[0, age: age + bins].double().numpy()
        else:
            start[0] = 1.0  # bin 0 alone: the attention mass, the hand-set point level with SnapKV
        score, exact = fitness(decode(start))
        state = {"generation": 0, "optimizer": ResumableSepCMA(mean=start.copy(), sigma=args.sigma,
                                                               population_size=args.population, seed=0),
                 "best": (float(score[0]), start, 0), "log": [{"generation": 0, "mean_score": float(score[0]),
                                                               "mean_exact": float(exact[0])}]}
        print(f"start: score {score[0]:.4f}, exact {exact[0]:.3f}", flush=True)
    run_generations(state, lambda thetas: fitness(decode(thetas)), args.population, args.generations,
                    lambda: state_path.write_bytes(pickle.dumps(state)))
    best_score, best, best_generation = state["best"]
    namm = NAMM(config, torch.as_tensor(decode(best), dtype=torch.float32), probe.norm_mean, probe.norm_var)
    record = {"target": "answers (one-shot)", "optimiser": "separable CMA-ES (seed 0)",
              "loss": "member_scores: exact match and likelihood against the full cache's",
              "budget": args.budget, "em_weight": args.em_weight,
              "population": args.population, "sigma": args.sigma, "generations": args.generations,
              "videos": len(entries), "annotations": args.annotations, "features": args.features,
              "start": args.start or "bin 0 alone", "best_generation": best_generation,
              "best_score": best_score, "log": state["log"],
              **run_metadata(), "command": shlex.join(["python", *sys.argv])}
    (out / "evolve.json").write_text(json.dumps(record, indent=2))
    save_fitted_namm(namm, out / "namm", record)


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
    p_evo = sub.add_parser("evolve", help="CMA-ES on the read-out, scored by one-shot answers on the videos")
    p_evo.add_argument("--annotations", required=True, help="a training split's videos (make-video-qa)")
    p_evo.add_argument("--features", default=SHIPPED, help="the NAMM whose features and statistics are read")
    p_evo.add_argument("--limit", type=int, default=None, help="read at most this many videos")
    p_evo.add_argument("--budget", type=float, default=0.15, help="kept share of the video tokens")
    p_evo.add_argument("--recent-tokens", type=int, default=32, help="the NAMM's recent window")
    p_evo.add_argument("--start", default=None, help="a linear NAMM whose read-out starts (default: bin 0)")
    p_evo.add_argument("--sigma", type=float, default=0.3, help="CMA-ES initial step size")
    p_evo.add_argument("--population", type=int, default=12, help="members per generation")
    p_evo.add_argument("--generations", type=int, default=40)
    p_evo.add_argument("--em-weight", type=float, default=0.5,
                       help="the score's weight on exact match (the rest: likelihood against the full's)")
    p_evo.add_argument("--block", type=int, default=13, help="members teacher-forced together")
    p_evo.add_argument("--out-dir", default="runs/video_evolve")
    args = parser.parse_args()
    {"pool": make_pool, "fit": fit, "evolve": evolve}[args.command](args)


if __name__ == "__main__":
    main()
