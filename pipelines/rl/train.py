"""``namm-transfer train-dt``: a ``transformers.DecisionTransformerModel`` trained on a Minari dataset.

The standard recipe (Chen et al. 2021; the Hugging Face DT example):

- subsequences of ``context`` (K) steps; an episode is drawn with probability proportional to its
  length and a start uniformly among its steps; windows that run past the episode end are padded
  on the **left** to K steps with a zero attention mask;
- states normalised by the dataset's mean / std; returns-to-go (undiscounted) divided by
  ``return_scale``; timesteps clipped to ``max_ep_len - 1``;
- loss: MSE between predicted and dataset actions on the non-padded steps;
- AdamW with linear warm-up then a constant rate, gradient clipping, dropout 0.1.

Writes ``out_dir`` as a Hugging Face model directory plus ``dt_meta.json`` (see
:mod:`namm_transfer.pipelines.rl.models`; :func:`~namm_transfer.pipelines.rl.models.load_dt` reads it),
``train_log.jsonl`` (appended every ``log_every`` steps) and TensorBoard scalars under
``out_dir/tensorboard``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from namm_transfer.pipelines.common import log, open_tensorboard, run_metadata, set_threads
from namm_transfer.pipelines.rl.models import observation_statistics, save_dt

LOG_NAME = "train_log.jsonl"
WINDOWS = ("start", "end")


@dataclass
class TrainDTConfig:
    """Settings of :func:`train_dt`.

    The defaults fit a few minutes of one CPU thread (a 0.86M-parameter model, ~0.13 s per step at
    batch 32); the original recipe trains 100k steps of batch 64 at lr 1e-4 with 10k warm-up steps.

    Attributes:
        dataset: Minari dataset id (e.g. ``namm/lunarlandercontinuous/expert-v0``); its reference scores
            and env spec are the ones stored.
        extra_datasets: more Minari dataset ids (same root, same spaces) whose episodes join the training
            set, e.g. noisier quality levels of the same controller for a wider state coverage.
        root: Minari root; None uses ``$MINARI_DATASETS_PATH`` or ``~/.minari/datasets``.
        steps: gradient steps.
        batch_size: subsequences per step.
        context: K, steps per subsequence (3K tokens).
        window: how training windows are drawn: ``start`` (the Hugging Face example: a random first
            step, the K steps from it) or ``end`` (a random last step, the K steps up to it: the
            window a rollout sees, so an episode shorter than K is always seen from its first step,
            which a memory task needs).
        loss: ``all`` (every action of a window, the usual DT loss) or ``last`` (each window's last action
            only; with ``window=end`` every step of an episode is then one target, so a rare decisive
            action, such as a memory task's final choice, is not drowned by the many easy ones).
        last_step_share: with ``window=end``, the share of windows that end at their episode's last step
            (the rest end at a uniform step). A sparse-reward task decided by its last action (the cue
            corridor's junction: 1 step in 121) otherwise sees that decision in <1% of the windows, and
            a DT that predicts the corridor's 0 there reaches a near-zero loss without remembering.
        hidden, layers, heads: GPT-2 width, depth and attention heads.
        dropout: residual, embedding and attention dropout.
        lr, weight_decay: AdamW.
        warmup_steps: linear warm-up of the learning rate.
        grad_clip: gradient norm clip.
        return_scale: returns-to-go divisor; None: the largest absolute episode return in the dataset.
        target_return: the return to condition rollouts on (stored, unscaled); None: the dataset's best
            episode return.
        max_ep_len: timestep-embedding size; None: the env's time limit (from the dataset's env spec),
            else the longest episode.
        log_every: steps between log lines (JSONL, TensorBoard, progress bar).
        seed: seeds the model initialisation, dropout and the batch sampling.
        device: torch device.
        threads: torch intra-op threads (None keeps torch's choice; 1 beside a busy process).
        out_dir: the model directory written.
    """

    dataset: str = "namm/lunarlandercontinuous/expert-v0"
    extra_datasets: tuple[str, ...] = ()
    root: str | None = None
    steps: int = 1500
    batch_size: int = 32
    context: int = 20
    window: str = "start"
    loss: str = "all"
    last_step_share: float = 0.0
    hidden: int = 128
    layers: int = 3
    heads: int = 1
    dropout: float = 0.1
    lr: float = 5e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 150
    grad_clip: float = 0.25
    return_scale: float | None = None
    target_return: float | None = None
    max_ep_len: int | None = None
    log_every: int = 50
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    out_dir: str = "runs/dt"

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.context, self.hidden, self.layers, self.heads) < 1:
            raise ValueError("steps, batch_size, context, hidden, layers and heads must all be >= 1")
        if self.loss not in ("all", "last"):
            raise ValueError(f"loss must be 'all' or 'last', got {self.loss!r}")
        if self.window not in WINDOWS:
            raise ValueError(f"window must be one of {WINDOWS}, got {self.window!r}")
        if not 0.0 <= self.last_step_share <= 1.0:
            raise ValueError(f"last_step_share must be in [0, 1], got {self.last_step_share}")
        if self.last_step_share > 0 and self.window != "end":
            raise ValueError("last_step_share needs window='end' (it picks where windows end)")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if self.return_scale is not None and self.return_scale <= 0:
            raise ValueError(f"return_scale must be > 0, got {self.return_scale}")


class SubsequenceSampler:
    """Left-padded K-step training windows from a list of :class:`~namm_transfer.envs.datasets.Episode`.

    Args:
        episodes: the dataset's episodes as arrays.
        context: K.
        state_mean, state_std: state normalisation.
        return_scale: returns-to-go divisor.
        max_ep_len: timesteps are clipped to ``max_ep_len - 1``.
        rng: draws episodes (weighted by length) and start (or end) steps.
        window: ``start`` or ``end`` (see :class:`TrainDTConfig`).
        last_step_share: with ``end``, the share of windows ending at the episode's last step.
    """

    def __init__(self, episodes: Sequence[Any], context: int, state_mean: np.ndarray, state_std: np.ndarray,
                 return_scale: float, max_ep_len: int, rng: np.random.Generator, window: str = "start",
                 last_step_share: float = 0.0):
        self.episodes = [ep for ep in episodes if len(ep) > 0]
        if not self.episodes:
            raise ValueError("the dataset has no non-empty episode")
        self.context, self.return_scale, self.max_ep_len, self.rng = context, return_scale, max_ep_len, rng
        self.window, self.last_step_share = window, last_step_share
        self.state_mean, self.state_std = state_mean, state_std
        lengths = np.array([len(ep) for ep in self.episodes], dtype=np.float64)
        self.probs = lengths / lengths.sum()
        # undiscounted returns-to-go of every step
        self.rtg = [np.cumsum(ep.rewards[::-1])[::-1].astype(np.float32) for ep in self.episodes]
        self.state_dim = self.episodes[0].observations.shape[1]
        self.act_dim = self.episodes[0].actions.shape[1]

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        """``states [B,K,S]``, ``actions [B,K,A]``, ``returns_to_go [B,K,1]``, ``timesteps [B,K]``,
        ``attention_mask [B,K]`` (1 on real steps; padding on the left)."""
        k = self.context
        states = np.zeros((batch_size, k, self.state_dim), dtype=np.float32)
        actions = np.zeros((batch_size, k, self.act_dim), dtype=np.float32)
        rtg = np.zeros((batch_size, k, 1), dtype=np.float32)
        timesteps = np.zeros((batch_size, k), dtype=np.int64)
        mask = np.zeros((batch_size, k), dtype=np.int64)
        picks = self.rng.choice(len(self.episodes), size=batch_size, p=self.probs)
        for b, e in enumerate(picks):
            ep = self.episodes[e]
            if self.window == "end":
                end = int(self.rng.integers(len(ep))) + 1
                if self.last_step_share and self.rng.random() < self.last_step_share:
                    end = len(ep)
                start = max(0, end - k)
            else:
                start = int(self.rng.integers(len(ep)))
                end = min(start + k, len(ep))
            n = end - start
            states[b, k - n :] = (ep.observations[start:end] - self.state_mean) / self.state_std
            actions[b, k - n :] = ep.actions[start:end]
            rtg[b, k - n :, 0] = self.rtg[e][start:end] / self.return_scale
            timesteps[b, k - n :] = np.minimum(np.arange(start, end), self.max_ep_len - 1)
            mask[b, k - n :] = 1
        return {
            "states": torch.from_numpy(states),
            "actions": torch.from_numpy(actions),
            "returns_to_go": torch.from_numpy(rtg),
            "timesteps": torch.from_numpy(timesteps),
            "attention_mask": torch.from_numpy(mask),
        }


def action_loss(model: Any, batch: dict[str, torch.Tensor], last_only: bool = False) -> torch.Tensor:
    """Mean squared error of the predicted actions on the non-padded steps (``last_only``: on each
    window's last step only, the action a rollout predicts with that window as its history)."""
    out = model(
        states=batch["states"],
        actions=batch["actions"],
        returns_to_go=batch["returns_to_go"],
        timesteps=batch["timesteps"],
        attention_mask=batch["attention_mask"],
        return_dict=True,
    )
    valid = batch["attention_mask"].bool()
    if last_only:
        valid = torch.zeros_like(valid)
        valid[:, -1] = True  # windows are left-padded: the last step is always real
    return ((out.action_preds - batch["actions"]) ** 2)[valid].mean()


@dataclass
class TrainDTResult:
    """The trained model (eval mode), the metadata written beside it, and the loss of every step."""

    model: Any
    meta: dict[str, Any]
    losses: list[float]


def build_model(cfg: TrainDTConfig, state_dim: int, act_dim: int, max_ep_len: int):
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    config = DecisionTransformerConfig(
        state_dim=state_dim,
        act_dim=act_dim,
        hidden_size=cfg.hidden,
        n_layer=cfg.layers,
        n_head=cfg.heads,
        n_inner=4 * cfg.hidden,
        max_ep_len=max_ep_len,
        n_positions=max(1024, 3 * cfg.context),
        action_tanh=True,
        activation_function="relu",
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
    )
    return DecisionTransformerModel(config)


def train_dt(cfg: TrainDTConfig, argv: Sequence[str] | None = None, dataset: Any = None) -> TrainDTResult:
    """Train, write ``cfg.out_dir`` and return the model. ``dataset`` (a ``MinariDataset``) skips the
    lookup of ``cfg.dataset`` (tests)."""
    from tqdm.auto import tqdm

    from namm_transfer.envs.datasets import dataset_ref_scores, episodes, load_dataset

    set_threads(cfg.threads)
    if dataset is None:
        dataset = load_dataset(cfg.dataset, cfg.root)
    dataset_id = dataset.spec.dataset_id
    eps = episodes(dataset)
    if not eps:
        raise ValueError(f"dataset {dataset_id!r} has no episodes")
    extra_ids = list(cfg.extra_datasets)
    for extra_id in extra_ids:
        extra = load_dataset(extra_id, cfg.root)
        if extra.observation_space != dataset.observation_space or extra.action_space != dataset.action_space:
            raise ValueError(
                f"dataset {extra_id!r} has spaces {extra.observation_space} / {extra.action_space}, "
                f"{dataset_id!r} has {dataset.observation_space} / {dataset.action_space}"
            )
        eps += episodes(extra)
    all_states = np.concatenate([ep.observations for ep in eps])
    state_mean, state_std = observation_statistics(all_states)
    returns = np.array([ep.episode_return for ep in eps])
    return_scale = cfg.return_scale or float(max(np.abs(returns).max(), 1.0))
    target_return = cfg.target_return if cfg.target_return is not None else float(returns.max())
    env_spec = dataset.env_spec
    env_id = env_spec.id if env_spec is not None else None
    max_ep_len = cfg.max_ep_len or (env_spec.max_episode_steps if env_spec is not None else None) \
        or max(len(ep) for ep in eps)

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    sampler = SubsequenceSampler(eps, cfg.context, state_mean, state_std, return_scale, int(max_ep_len), rng,
                                 cfg.window, cfg.last_step_share)
    model = build_model(cfg, sampler.state_dim, sampler.act_dim, int(max_ep_len)).to(cfg.device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    )

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / LOG_NAME).unlink(missing_ok=True)
    writer = open_tensorboard(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    names = ", ".join([dataset_id, *extra_ids])
    log(f"training a {n_params / 1e3:.0f}k-parameter Decision Transformer on {names} "
        f"({len(eps)} episodes, {len(all_states)} steps), K={cfg.context}, {cfg.steps} steps")

    losses: list[float] = []
    started = time.perf_counter()
    bar = tqdm(total=cfg.steps, desc="train-dt", unit="step")
    for step in range(cfg.steps):
        batch = {k: v.to(cfg.device) for k, v in sampler.sample(cfg.batch_size).items()}
        loss = action_loss(model, batch, last_only=cfg.loss == "last")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if not np.isfinite(losses[-1]):
            raise FloatingPointError(f"non-finite loss {losses[-1]} at step {step}; lower --lr")
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            window = losses[-cfg.log_every :]
            record = {"step": step + 1, "loss": float(np.mean(window)), "lr": scheduler.get_last_lr()[0],
                      "seconds": time.perf_counter() - started}
            with open(out_dir / LOG_NAME, "a") as f:
                f.write(json.dumps(record) + "\n")
            if writer is not None:
                writer.add_scalar("train/action_mse", record["loss"], record["step"])
                writer.add_scalar("train/lr", record["lr"], record["step"])
            bar.set_postfix(loss=f"{record['loss']:.4f}")
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - started
    model.eval()

    refs = dataset_ref_scores(dataset)
    meta = {
        "env_id": env_id,
        "dataset_id": dataset_id,
        "extra_dataset_ids": extra_ids,
        "state_mean": state_mean.tolist(),
        "state_std": state_std.tolist(),
        "return_scale": return_scale,
        "context": cfg.context,
        "target_return": target_return,
        "max_ep_len": int(max_ep_len),
        "ref_min_score": None if refs is None else refs[0],
        "ref_max_score": None if refs is None else refs[1],
        "seed": cfg.seed,
        "config": asdict(cfg),
        "dataset_stats": {
            "episodes": len(eps),
            "steps": int(len(all_states)),
            "return_mean": float(returns.mean()),
            "return_max": float(returns.max()),
        },
        "training": {
            "steps": cfg.steps,
            "parameters": n_params,
            "seconds": seconds,
            "loss_first": losses[0],
            "loss_last_window": float(np.mean(losses[-cfg.log_every :])),
        },
        **run_metadata(argv),
    }
    save_dt(model, out_dir, meta)
    if writer is not None:
        writer.close()
    last = meta["training"]["loss_last_window"]
    log(f"trained in {seconds:.0f} s, action MSE {losses[0]:.4f} -> {last:.4f}; model in {out_dir}")
    return TrainDTResult(model, meta, losses)
