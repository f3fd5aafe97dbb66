"""Decision Transformer model directories: ours (written by ``train-dt``) and the public format.

Our format is a Hugging Face model directory (``config.json`` + ``model.safetensors``, from
``save_pretrained``) plus ``dt_meta.json``: state mean/std, return scale, context K, target return,
env and dataset ids, reference scores, seed, command and git revision.

The public checkpoints ``edbeeching/decision-transformer-gym-{hopper,walker2d,halfcheetah}-{medium,
medium-replay,expert}`` hold only ``config.json`` and the weights (``pytorch_model.bin``): their state
mean/std are not stored, so :func:`load_dt` takes them from the caller (the D4RL dataset's observation
statistics); their return scale is 1000 and their context 20 (the Hugging Face DT example they were
trained with). They were trained on D4RL v2 data (v3 envs): pair them with the v4 envs.

Small trained DTs ship with the package (``namm_transfer/pretrained_dt/<name>/``, our format plus a
README with the command and scores): ``load_dt("lunarlander-expert")``; :func:`available_dts` lists them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from namm_transfer.shipped import KINDS, available, pretrained_dir, resolve

META_NAME = "dt_meta.json"
SHIPPED_DIR = KINDS["dt"][0]
META_FORMAT = "namm-transfer-dt/1"
PUBLIC_RETURN_SCALE = 1000.0  # the Hugging Face DT example / edbeeching checkpoints
PUBLIC_CONTEXT = 20


@dataclass
class LoadedDT:
    """A Decision Transformer with what is needed to drive it.

    Attributes:
        model: ``transformers.DecisionTransformerModel`` in eval mode.
        state_mean, state_std: observation normalisation, ``[state_dim]``.
        return_scale: returns-to-go are divided by it.
        context: the K steps it was trained on.
        target_return: the return to condition on (unscaled), None when unknown.
        env_id, dataset_id: where it comes from (None when unknown).
        meta: the full ``dt_meta.json`` (empty for the public format).
        source: the directory or hub id it was loaded from.
    """

    model: Any
    state_mean: np.ndarray
    state_std: np.ndarray
    return_scale: float
    context: int
    target_return: float | None = None
    env_id: str | None = None
    dataset_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def state_dim(self) -> int:
        return int(self.model.config.state_dim)

    @property
    def act_dim(self) -> int:
        return int(self.model.config.act_dim)

    def normalise_states(self, observations: Any) -> np.ndarray:
        """``(obs - mean) / std`` for ``[..., state_dim]`` observations."""
        obs = np.asarray(observations, dtype=np.float32)
        if obs.shape[-1:] != (self.state_dim,):
            raise ValueError(
                f"observations of shape {obs.shape} do not match the model's state_dim {self.state_dim} "
                f"({self.source})"
            )
        return (obs - self.state_mean) / self.state_std

    def scale_returns(self, returns: Any) -> np.ndarray:
        return np.asarray(returns, dtype=np.float32) / self.return_scale

    def check_spaces(self, observation_space: Any, action_space: Any, what: str = "environment") -> None:
        """Raise ``ValueError`` unless the spaces are flat boxes of the model's state and action sizes."""
        obs_shape = tuple(getattr(observation_space, "shape", None) or ())
        act_shape = tuple(getattr(action_space, "shape", None) or ())
        if obs_shape != (self.state_dim,) or act_shape != (self.act_dim,):
            raise ValueError(
                f"{what} has observations of shape {obs_shape} and actions of shape {act_shape}, but the "
                f"Decision Transformer from {self.source} expects ({self.state_dim},) and ({self.act_dim},)"
            )

    def check_dataset(self, dataset: Any) -> None:
        """:meth:`check_spaces` against a Minari dataset."""
        self.check_spaces(dataset.observation_space, dataset.action_space,
                          f"dataset {dataset.spec.dataset_id!r}")


def save_dt(model: Any, directory: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """``model.save_pretrained(directory)`` plus ``dt_meta.json``; files are written to a temporary
    folder first and moved in, so a reader never sees a half-written model."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory / ".saving"
    if staging.exists():
        for f in staging.iterdir():
            f.unlink()
    model.save_pretrained(staging)
    (staging / META_NAME).write_text(json.dumps({"format": META_FORMAT, **meta}, indent=2) + "\n")
    for f in staging.iterdir():
        os.replace(f, directory / f.name)
    staging.rmdir()
    return directory


def available_dts() -> list[str]:
    """Short names of the Decision Transformers shipped with the package."""
    return available("dt")


def shipped_dt_dir(name: str) -> Path:
    """The directory of the shipped Decision Transformer ``name`` (KeyError listing them if unknown)."""
    return pretrained_dir(name, "dt")


def _local_dir(source: str | os.PathLike) -> Path:
    return resolve(source, "dt", allow_patterns=["*.json", "*.safetensors", "*.bin"])


def load_dt(
    source: str | os.PathLike,
    state_mean: Any = None,
    state_std: Any = None,
    *,
    context: int | None = None,
    return_scale: float | None = None,
    target_return: float | None = None,
    device: str | torch.device = "cpu",
) -> LoadedDT:
    """Load a Decision Transformer: a directory, a shipped short name (:func:`available_dts`, e.g.
    ``"lunarlander-expert"``) or a Hub id; ours or the public edbeeching format.

    Arguments given here override what ``dt_meta.json`` says; for the public format ``state_mean``
    and ``state_std`` are required (``context`` defaults to 20, ``return_scale`` to 1000).

    Raises:
        FileNotFoundError: no such directory / unreachable Hub id / no ``config.json``.
        ValueError: not a Decision Transformer, missing or mis-shaped state statistics.
    """
    from transformers import AutoConfig, DecisionTransformerModel

    directory = _local_dir(source)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{source!r} has no config.json: not a Hugging Face model directory")
    config = AutoConfig.from_pretrained(directory)
    if config.model_type != "decision_transformer":
        raise ValueError(f"{source!r} holds a {config.model_type!r} model, not a decision_transformer")
    meta: dict[str, Any] = {}
    if (directory / META_NAME).is_file():
        meta = json.loads((directory / META_NAME).read_text())
    elif state_mean is None or state_std is None:
        raise ValueError(
            f"{source!r} has no {META_NAME} (the public edbeeching/decision-transformer-gym-* checkpoints do "
            f"not store their state statistics): pass state_mean and state_std, the observation mean and "
            f"std of the dataset it was trained on"
        )
    mean = np.asarray(state_mean if state_mean is not None else meta["state_mean"], dtype=np.float32)
    std = np.asarray(state_std if state_std is not None else meta["state_std"], dtype=np.float32)
    for name, value in (("state_mean", mean), ("state_std", std)):
        if value.shape != (config.state_dim,):
            raise ValueError(f"{name} has shape {value.shape}, the model's state_dim is {config.state_dim}")
    model = DecisionTransformerModel.from_pretrained(directory).to(device).eval()
    return LoadedDT(
        model=model,
        state_mean=mean,
        state_std=std,
        return_scale=float(return_scale or meta.get("return_scale", PUBLIC_RETURN_SCALE)),
        context=int(context or meta.get("context", PUBLIC_CONTEXT)),
        target_return=target_return if target_return is not None else meta.get("target_return"),
        env_id=meta.get("env_id") or _public_env_id(str(source)),
        dataset_id=meta.get("dataset_id"),
        meta=meta,
        source=str(source),
    )


def state_statistics(source: str | os.PathLike,
                     root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(state_mean, state_std)`` for a DT that does not store them (the public format): from a JSON
    file ``{"state_mean": [...], "state_std": [...]}`` or from the observations of a Minari dataset id
    (e.g. a D4RL dataset the user converted to Minari under ``root``), as ``train-dt`` computes them."""
    path = Path(source)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"state statistics file {path} does not exist")
        data = json.loads(path.read_text())
        missing = {"state_mean", "state_std"} - set(data)
        if missing:
            raise ValueError(f"{path} lacks {sorted(missing)}: it needs state_mean and state_std lists")
        return np.asarray(data["state_mean"], np.float32), np.asarray(data["state_std"], np.float32)
    from namm_transfer.envs import episodes, load_dataset

    observations = [ep.observations for ep in episodes(load_dataset(str(source), root))]
    return observation_statistics(np.concatenate(observations))


def observation_statistics(states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, std + 1e-6)`` over the steps of ``states`` ``[steps, state_dim]``: a DT's state
    normalisation, as ``train-dt`` stores it."""
    return states.mean(axis=0), states.std(axis=0) + 1e-6


def _public_env_id(name: str) -> str | None:
    """``edbeeching/decision-transformer-gym-hopper-medium`` -> ``Hopper-v4`` (None if no D4RL task)."""
    from namm_transfer.envs.scores import D4RL_ENV_IDS, d4rl_task

    task = d4rl_task(Path(name).name)
    return D4RL_ENV_IDS[task] if task else None
