"""`video_readout_fit.py fit` on a synthetic video pool (the pool itself needs the shipped video model):
it fits the shared read-out as `fit-heads --shared` does, saves a ranking linear NAMM with the pool's
feature statistics and the recent window asked for, and refuses a text pool."""

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from namm_transfer import NAMM, NAMMConfig

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scripts" / "video_readout_fit.py"


def script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)


def video_pool(path: Path, tasks: list[str], evidence: bool = True) -> None:
    """Four videos, 2 layer-heads, 160 positions, 3 bins (after 8 age features): the question's attention
    grows with bin 0 and falls with bin 1; the answer frames' 8 tokens stand out in bin 2 alone."""
    gen = torch.Generator().manual_seed(0)
    pool, marks = [], []
    for _ in range(4):
        x = torch.cat([torch.zeros(2, 160, 8), torch.randn(2, 160, 3, generator=gen)], -1)
        mark = torch.zeros(160, dtype=torch.bool)
        mark[torch.randperm(156, generator=gen)[:8] + 4] = True  # never a sink
        x[:, mark, 10] += 3.0
        target = torch.exp(1.5 * x[..., 8] - 1.5 * x[..., 9])
        pool.append((x, target, torch.ones(2, 160, dtype=torch.bool), torch.arange(160).expand(2, -1)))
        marks.append(mark)
    config = asdict(NAMMConfig(n_fft=4, hop=2))
    saved = {"pool": pool, "config": config, "mean": torch.zeros(3), "var": torch.full((3,), 4.0),
             "with_age": True, "future": None, "tasks": tasks, "model": "smollm2-shapes-128"}
    if evidence:
        saved["evidence"] = marks
    torch.save(saved, path)


def test_fit_learns_the_questions_ranking_and_saves_a_ranking_namm(tmp_path):
    video_pool(tmp_path / "video.pt", ["video"])
    done = script("fit", "--cache", str(tmp_path / "video.pt"), "--steps", "400", "--lr", "0.05",
                  "--exclude-recent", "0", "--recent-tokens", "32", "--out-dir", str(tmp_path),
                  "--save-namm", str(tmp_path / "namm"))
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "video_fit.json").read_text())
    assert record["tasks"] == ["video"] and record["model"] == "smollm2-shapes-128" and record["shared"]
    assert record["reference_losses"]["fitted"] < record["reference_losses"]["equal scores"] - 0.3
    namm = NAMM.from_pretrained(tmp_path / "namm")
    assert (namm.config.scorer, namm.config.recent_tokens, namm.config.threshold) == ("linear", 32, None)
    weights = namm.params[0, 8:11]  # after the (zero) age weights
    assert weights[0] > 0.2 and weights[1] < -0.2 and namm.params[0, :8].abs().max() == 0
    assert torch.equal(namm.norm_var, torch.full((3,), 4.0))  # the pool's statistics


def test_fit_refuses_a_text_pool(tmp_path):
    video_pool(tmp_path / "text.pt", ["passkey", "kv", "docs"])
    done = script("fit", "--cache", str(tmp_path / "text.pt"), "--save-namm", str(tmp_path / "namm"))
    assert done.returncode != 0 and "is not a video pool" in done.stderr


def test_fit_towards_the_answer_frames_ranks_them_first(tmp_path):
    """--target evidence: the read-out learns the bin the answer frames stand out in (bin 2), not the
    question's attention (bins 0 and 1); a pool without answer frames is refused."""
    video_pool(tmp_path / "video.pt", ["video"])
    done = script("fit", "--target", "evidence", "--cache", str(tmp_path / "video.pt"), "--steps", "400",
                  "--lr", "0.05", "--exclude-recent", "0", "--out-dir", str(tmp_path),
                  "--save-namm", str(tmp_path / "namm"))
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "video_fit.json").read_text())
    assert record["target"] == "evidence"
    assert record["reference_losses"]["fitted"] < record["reference_losses"]["equal scores"] - 1.0
    weights = NAMM.from_pretrained(tmp_path / "namm").params[0, 8:11]
    assert weights[2] > 0.5 and weights[2] > 3 * weights[:2].abs().max()

    video_pool(tmp_path / "bare.pt", ["video"], evidence=False)
    done = script("fit", "--target", "evidence", "--cache", str(tmp_path / "bare.pt"),
                  "--save-namm", str(tmp_path / "x"))
    assert done.returncode != 0 and "holds no answer frames" in done.stderr


def test_one_shot_fraction_keeps_eval_videos_one_shot_cap():
    """evolve scores each member at the cap eval-video's one-shot run gives (capped_policy): a budget share
    of the video tokens plus the text before the video's end, for any text length and budget."""
    from types import SimpleNamespace

    sys.path.insert(0, str(SCRIPT.parent))
    from video_readout_fit import one_shot_fraction

    from namm_transfer.pipelines.video.evaluate import capped_policy

    video_token = 99
    for text_before, video_tokens, budget in ((3, 512, 0.15), (7, 128, 0.25), (1, 300, 0.5)):
        ids = [1] * text_before + [video_token] * video_tokens + [2] * 20
        context = text_before + video_tokens  # the prefill stops at the video's end
        _, _, info = capped_policy("H2O", None, budget, "one-shot", ids, video_tokens, video_token, 256)
        entry = SimpleNamespace(prefill=SimpleNamespace(context_len=context))
        assert info["video_end"] == context
        assert round(one_shot_fraction(entry, budget, video_tokens) * context) == info["cap"]


def test_run_generations_keeps_the_scored_mean_and_climbs():
    """On a quadratic, run_generations climbs from the start, logs every generation, and keeps as best the
    mean it scored with that very score (not the mean after the update), saving after each generation."""
    import numpy as np

    sys.path.insert(0, str(SCRIPT.parent))
    from video_readout_fit import run_generations

    from namm_transfer.pipelines.text.cma import ResumableSepCMA

    optimum = np.array([1.0, -2.0, 0.5])

    def fitness(rows):
        score = -((rows - optimum) ** 2).sum(-1)
        return score, (score > -0.1).astype(float)

    start = np.zeros(3)
    optimizer = ResumableSepCMA(mean=start.copy(), sigma=0.5, population_size=8, seed=0)
    state = {"generation": 0, "optimizer": optimizer,
             "best": (float(fitness(start[None])[0][0]), start, 0), "log": []}
    saves = []
    run_generations(state, fitness, 8, 25, lambda: saves.append(state["generation"]))
    score, best, generation = state["best"]
    assert saves == list(range(1, 26)) and [r["generation"] for r in state["log"]] == saves
    assert score == float(fitness(best[None])[0][0]) > -0.5 > fitness(start[None])[0][0]
    assert state["log"][generation - 1]["mean_score"] == score
