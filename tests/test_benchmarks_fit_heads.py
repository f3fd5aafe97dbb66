"""`joint_readouts.py fit-heads` and `text-bins` on synthetic feature pools: what the fitted shared read-out
learns, what `--nonneg` constrains, which bin `text-bins` finds per task, and which caches `fit-heads`
refuses (the text pool itself needs the real SmolLM2, so the pools here are cache files of its layout);
and the NAMMs and bins `text-fitness` refuses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scripts" / "joint_readouts.py"


def script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)


def synthetic_cache(path: Path) -> None:
    """Four prompts, 2 layer-heads, 160 positions, 3 bins: the attention a token goes on receiving grows
    with bin 0 and falls with bin 1 (bin 2 is noise)."""
    gen = torch.Generator().manual_seed(0)
    pool = []
    for _ in range(4):
        x = torch.randn(2, 160, 3, generator=gen)
        target = torch.exp(1.5 * x[..., 0] - 1.5 * x[..., 1]) + 0.05 * torch.rand(2, 160, generator=gen)
        positions = torch.arange(160).expand(2, -1)
        pool.append((x, target, torch.ones(2, 160, dtype=torch.bool), positions))
    config = {"ema_decay": 0.9999, "age_dim": 8}
    torch.save({"pool": pool, "config": config, "mean": None, "var": None, "with_age": False, "future": None},
               path)


def fit(tmp_path: Path, *extra: str) -> tuple[list[float], dict, subprocess.CompletedProcess]:
    cache = tmp_path / "pool.pt"
    if not cache.exists():
        synthetic_cache(cache)
    name = "nonneg" if "--nonneg" in extra else "free"
    done = script("fit-heads", "--shared", "--steps", "400", "--lr", "0.05", "--cache", str(cache),
                  "--name", name, "--out-dir", str(tmp_path), *extra)
    if done.returncode != 0:
        return [], {}, done
    weights = torch.load(tmp_path / f"{name}.pt")["weights"]
    record = json.loads((tmp_path / f"{name}.json").read_text())
    return weights[0].tolist(), record, done


def test_fit_heads_learns_signs_and_nonneg_projects_them(tmp_path):
    free, record, done = fit(tmp_path)
    assert done.returncode == 0, done.stderr
    assert free[0] > 0.2 and free[1] < -0.2 and abs(free[2]) < 0.5 * min(free[0], -free[1])
    assert record["nonneg"] is False
    assert record["reference_losses"]["fitted"] < record["reference_losses"]["equal scores"]

    nonneg, record, done = fit(tmp_path, "--nonneg")
    assert done.returncode == 0, done.stderr
    assert min(nonneg) >= 0.0 and nonneg[1] == 0.0 and nonneg[0] > 0.2
    assert record["nonneg"] is True
    # the constraint costs loss where the truth has a negative weight
    assert record["reference_losses"]["fitted"] > json.loads((tmp_path / "free.json").read_text())[
        "reference_losses"]["fitted"]


def test_text_bins_finds_each_tasks_own_bin(tmp_path):
    """A pool of 3 tasks x 16 prompts in the pool's order, where task k's future attention follows bin k:
    per task, bin k alone ranks best, well below equal scores."""
    gen = torch.Generator().manual_seed(1)
    pool = []
    for task in range(3):
        for _ in range(16):
            x = torch.randn(1, 120, 3, generator=gen)
            target = torch.exp(2.0 * x[..., task])
            pool.append((x, target, torch.ones(1, 120, dtype=torch.bool), torch.arange(120)[None]))
    cache = tmp_path / "tasks.pt"
    torch.save({"pool": pool, "config": {"ema_decay": 0.97, "age_dim": 8}, "with_age": False}, cache)
    done = script("text-bins", "--cache", str(cache), "--exclude-recent", "0")
    assert done.returncode == 0, done.stderr
    rows = [line.strip("| ").split(" | ") for line in done.stdout.splitlines() if line.startswith("| ")][1:]
    assert [r[0] for r in rows] == ["passkey", "kv", "docs"]
    for task, row in enumerate(rows):
        equal, alone = float(row[1]), [float(v) for v in row[2:]]
        assert min(range(3), key=alone.__getitem__) == task
        assert alone[task] < equal - 0.2


def test_fit_heads_refuses_a_cache_of_another_decay_tasks_or_features(tmp_path):
    synthetic_cache(tmp_path / "pool.pt")
    _, _, done = fit(tmp_path, "--ema-decay", "0.99")
    assert done.returncode != 0
    assert "pool.pt holds the pool of" in done.stderr and "0.99" in done.stderr and "--cache" in done.stderr
    _, _, done = fit(tmp_path, "--tasks", "hop", "vartrack")  # a cache of the default tasks
    assert done.returncode != 0 and "'tasks': ['hop', 'vartrack']" in done.stderr
    _, _, done = fit(tmp_path, "--ema-unbiased")  # a cache of the reference's (summed) features
    assert done.returncode != 0 and "'ema_unbiased': True" in done.stderr


def test_text_fitness_refuses_a_namm_without_a_linear_read_out_and_bins_out_of_range():
    """Both checks come before the model loads: a clear message, not a wrong table."""
    done = script("text-fitness", "--namm", "smollm2-text")
    assert done.returncode != 0 and "'bam' scorer" in done.stderr and "linear" in done.stderr
    done = script("text-fitness", "--bins", "17")
    assert done.returncode != 0 and "--bins must be in 0..16" in done.stderr


def test_fit_heads_score_pool_fits_a_target_spread_over_neighbours(tmp_path):
    """A target that follows bin 0 averaged over 5 neighbouring tokens: the read-out fitted with
    ``--score-pool 5`` ranks it better than the unpooled fit (its loss is lower), and the record says so."""
    gen = torch.Generator().manual_seed(2)
    pool = []
    for _ in range(4):
        x = torch.randn(2, 160, 3, generator=gen)
        spread = torch.nn.functional.avg_pool1d(x[None, ..., 0], 5, 1, 2, count_include_pad=False)[0]
        positions = torch.arange(160).expand(2, -1)
        pool.append((x, torch.exp(3.0 * spread), torch.ones(2, 160, dtype=torch.bool), positions))
    cache = tmp_path / "spread.pt"
    torch.save({"pool": pool, "config": {"ema_decay": 0.9999, "age_dim": 8}, "with_age": False}, cache)
    losses = {}
    for kernel in ("1", "5"):
        done = script("fit-heads", "--shared", "--steps", "400", "--lr", "0.05", "--cache", str(cache),
                      "--name", f"pool{kernel}", "--out-dir", str(tmp_path), "--score-pool", kernel)
        assert done.returncode == 0, done.stderr
        record = json.loads((tmp_path / f"pool{kernel}.json").read_text())
        assert record["score_pool"] == int(kernel)
        losses[kernel] = record["reference_losses"]["fitted"]
    assert losses["5"] < losses["1"] - 0.1


def test_fit_bam_learns_a_ranking_and_starts_from_a_linear_read_out(tmp_path):
    """fit-bam on the synthetic pool: from scratch it ranks the target far better than equal scores and
    saves a ranking BAM NAMM without age features; warm-started from a linear NAMM, its step-0 loss is that
    read-out's own listwise loss; a missing cache is named."""
    sys.path.insert(0, str(SCRIPT.parent))
    from namm_transfer import NAMM, NAMMConfig
    from namm_transfer.pipelines.text.evolve_shared import topk_loss

    cache = tmp_path / "pool.pt"
    synthetic_cache(cache)
    saved = torch.load(cache)
    saved["config"].update(n_fft=4, hop=2)  # 3 spectral bins, as the synthetic features
    torch.save(saved, cache)
    done = script("fit-bam", "--cache", str(cache), "--steps", "300", "--lr", "0.03", "--exclude-recent", "0",
                  "--save-namm", str(tmp_path / "bam"))
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "bam" / "training.json").read_text())
    losses = record["reference_losses"]
    assert losses["fitted"] < losses["equal scores"] - 0.3
    namm = NAMM.from_pretrained(tmp_path / "bam")
    assert (namm.config.scorer, namm.config.age_dim, namm.config.recent_tokens, namm.config.threshold) == (
        "bam", 0, 61, None)

    weights = torch.tensor([1.0, -0.5, 0.2])
    config = NAMMConfig(n_fft=4, hop=2, scorer="linear", threshold=None)
    NAMM(config, torch.cat([torch.zeros(8), weights, torch.zeros(1)])[None]).save_pretrained(tmp_path / "lin")
    done = script("fit-bam", "--cache", str(cache), "--steps", "0", "--exclude-recent", "0",
                  "--warm-start", str(tmp_path / "lin"), "--save-namm", str(tmp_path / "warm"))
    assert done.returncode == 0, done.stderr
    start = json.loads((tmp_path / "warm" / "training.json").read_text())["reference_losses"]["warm start"]
    expected = sum(float(topk_loss(x @ weights, t, v & (p >= 4))) for x, t, v, p in saved["pool"]) / 4
    assert abs(start - expected) < 1e-4

    done = script("fit-bam", "--cache", str(tmp_path / "none.pt"), "--save-namm", str(tmp_path / "x"))
    assert done.returncode != 0 and "none.pt does not exist" in done.stderr
