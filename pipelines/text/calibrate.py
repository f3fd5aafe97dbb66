"""``namm-transfer calibrate``: set a trained NAMM's threshold-mode operating point on training prompts.

A NAMM in its own threshold mode keeps the tokens scoring >= ``threshold``; how many that is depends
on the final bias. This job sets the bias (and the threshold to 0) so that the NAMM, compressing a
training context once, keeps ``keep`` of it (the evolve job's last step, ``--keep-target``), on the
same prompts an evolve run with this ``seed`` trains on. With ``--joint-reference`` it first switches
a joint NAMM to another reference (``NAMMConfig.joint_reference``). Everything else (weights,
statistics, cadence) is kept. Writes the NAMM to ``out_dir`` with ``calibration.json`` (command, git
revision, the bias before and after, the prompts).

    namm-transfer calibrate --namm smollm2-text-joint-v1 --joint-reference fresh-median \
        --out-dir runs/smollm2-text-joint-fresh   # smollm2-text-joint-v2
    namm-transfer calibrate --namm runs/evolve-joint-mixed-hard/namm --prompt-lengths 1024 1536 \
        --min-tokens 256 --out-dir runs/smollm2-text-joint-v3   # smollm2-text-joint-v3
    namm-transfer calibrate --namm smollm2-text-joint-v4 --keep 0.35 --prompt-lengths 1024 1536 \
        --min-tokens 384 --out-dir runs/cal35_f384   # the shipped smollm2-text-joint
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from namm_transfer import NAMM
from namm_transfer.pipelines.common import log, run_metadata, set_threads


@dataclass
class CalibrateConfig:
    """Settings of ``calibrate``.

    Attributes:
        namm: the NAMM (shipped name, path or Hub id).
        out_dir: where the calibrated NAMM is written.
        keep: share of a training context the calibrated NAMM keeps, compressed once, in threshold mode.
        joint_reference: a joint NAMM's new reference ("absolute" or "fresh-median"); None keeps its own.
        tasks: the text tasks whose training prompts calibrate it.
        pool_per_task: training prompts per task.
        prompt_tokens: prompt length in tokens.
        prompt_lengths: several prompt lengths, one per prompt by its seed (the evolve run's
            ``--prompt-lengths``, to calibrate on its very prompts); None: ``prompt_tokens``.
        min_tokens: the calibrated NAMM's floor in threshold mode (``NAMMConfig.min_tokens``: it never
            keeps fewer than that many best-scoring tokens); None keeps the NAMM's own.
        seed: the evolve run's seed (its training prompts are the split's, offset by it).
        threads: torch intra-op threads.
    """

    namm: str = "smollm2-text-joint"
    out_dir: str = "runs/calibrated"
    keep: float = 0.4
    joint_reference: str | None = None
    tasks: list[str] = field(default_factory=lambda: ["passkey", "kv", "docs"])
    pool_per_task: int = 16
    prompt_tokens: int = 1024
    prompt_lengths: list[int] | None = None
    min_tokens: int | None = None
    seed: int = 0
    threads: int | None = 1

    def __post_init__(self) -> None:
        if not 0 < self.keep < 1:
            raise ValueError(f"keep must be a fraction in (0, 1), got {self.keep}")
        if self.pool_per_task < 1:
            raise ValueError(f"pool_per_task must be >= 1, got {self.pool_per_task}")
        if self.min_tokens is not None and self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")


def run_calibrate(cfg: CalibrateConfig, tasks: dict, argv=None) -> NAMM:
    from tqdm.auto import tqdm

    from namm_transfer.adapters import attach
    from namm_transfer.pipelines.models import load_named_model
    from namm_transfer.pipelines.text.evolve_shared import (
        PrefillPool,
        calibrate_bias,
        calibrate_joint_bias,
        pool_seeds,
    )

    set_threads(cfg.threads)
    unknown = [t for t in cfg.tasks if t not in tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {', '.join(tasks)}")
    namm = NAMM.from_pretrained(cfg.namm)
    if namm.norm_mean is None:
        raise ValueError(f"{cfg.namm} has no feature statistics: calibrate a trained NAMM")
    config = namm.config
    if cfg.joint_reference is not None:
        if not namm.joint:
            raise ValueError("--joint-reference applies to a joint NAMM (scorer='joint') only")
        config = replace(config, joint_reference=cfg.joint_reference)
    # the features a joint NAMM reads are a per-head NAMM's with the same spectrogram settings
    per_head = config
    if namm.joint:
        per_head = replace(config, scorer="bam", joint_rows=0, joint_reference="absolute")
    probe = NAMM(per_head, None, namm.norm_mean, namm.norm_var)
    model, tokenizer = load_named_model("smollm2")
    with attach(model, NAMM(per_head)) as handle:
        pool = PrefillPool(model, tokenizer, handle, tasks, per_head, cfg.prompt_lengths or cfg.prompt_tokens)
        prompts = [(t, s) for t in cfg.tasks for s in pool_seeds(cfg.seed, "train", cfg.pool_per_task)]
        entries = [pool.get(t, s) for t, s in tqdm(prompts, desc="prefill", unit="prompt")]
        params = namm.params[0]
        if namm.joint:
            params = calibrate_joint_bias(params, entries, probe, cfg.keep, config.joint_reference)
        else:
            params = calibrate_bias(params, entries, probe, cfg.keep)
    # the bias is set for the threshold 0: that is the operating point saved
    if cfg.min_tokens is not None:
        config = replace(config, min_tokens=cfg.min_tokens)
    calibrated = NAMM(replace(config, threshold=0.0), params, namm.norm_mean, namm.norm_var)
    out = Path(cfg.out_dir)
    calibrated.save_pretrained(out)
    record = {
        **run_metadata(argv),
        "config": asdict(cfg),
        "bias_before": float(namm.params[0, -1]),
        "bias_after": float(params[-1]),
        "prompts": [f"{t}:{s}" for t, s in prompts],
    }
    (out / "calibration.json").write_text(json.dumps(record, indent=2))
    log(f"bias {record['bias_before']:.3f} -> {record['bias_after']:.3f}; NAMM in {out}")
    return calibrated
