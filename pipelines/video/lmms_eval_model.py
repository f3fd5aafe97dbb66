"""An lmms-eval model plugin: any LLaVA video model ``attach`` supports, with a NAMM or a baseline attached.

Registered through the ``lmms_eval.models`` entry point (``pyproject.toml``) as ``namm_transfer``; lmms-eval's
``get_model`` finds only entry-point manifests, not a bare ``@register_model``. Install it without
torchvision (lmms-eval imports torchvision only in some of its bundled model files)::

    pip install --no-deps lmms-eval==0.7.3
    pip install 'namm-transfer[lmms]'

Then, for example::

    python -m lmms_eval --model namm_transfer \\
        --model_args model=smollm2-shapes,policy=NAMM,namm=smollm2-text,budget=64 --tasks <task>

Model args (``key=value``, comma separated):

- ``model``: a ``train-video-model`` output (shipped short name or directory) or a LLaVA video
  ``from_pretrained`` directory; ``loader``: ``module:function`` returning ``(model, tokenizer)`` instead.
- ``policy``: a registered policy name (``FullCache``, ``NAMM``, ``Recency``, ``H2O``, ...).
- ``namm``: the NAMM (shipped name, directory or Hub id) for ``policy=NAMM``.
- ``head_mix``: a joint NAMM's :attr:`~namm_transfer.NAMMConfig.head_mix` (default: the NAMM's own).
- ``budget``: tokens kept per layer and KV head (the NAMM's hard cap, or a baseline's budget);
  baselines need it. ``update_every``: the cadence, also the prompt's prefill chunk.
- ``num_frames`` (default: the model's own, else 32), ``max_new_tokens``, ``device``, ``dtype``, ``seed``,
  ``system``, ``answer_prefix``.

The task's context (its ``doc_to_text``) is the user turn after the video, in the model's chat format
(:func:`~namm_transfer.pipelines.video.io.build_prompt`); the first visual of ``doc_to_visual`` must be
a video path. Only generation is supported (lmms-eval's multiple-choice video tasks generate).
"""

from __future__ import annotations

from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from tqdm import tqdm

from namm_transfer.pipelines.common import parse_dtype
from namm_transfer.pipelines.video.evaluate import generate_with_policy
from namm_transfer.pipelines.video.loading import load_video_model

MODEL_ID = "namm_transfer"


def _optional(value: Any, cast: type) -> Any:
    """A model arg's value as ``cast``, or None where lmms-eval passes none."""
    return None if value in (None, "", "None", "none") else cast(value)


class NAMMTransferVideo(lmms):
    """lmms-eval model: a LLaVA video model with a memory policy attached to its language model's cache."""

    is_simple = True

    def __init__(self, model: str | None = None, loader: str | None = None, policy: str = "NAMM",
                 namm: str = "smollm2-text", head_mix: float | str | None = None,
                 budget: int | str | None = None, update_every: int | str = 32,
                 num_frames: int | str | None = None, max_new_tokens: int | str = 16, device: str = "cpu",
                 dtype: str = "float32", seed: int | str = 0, system: str | None = None,
                 answer_prefix: str = "", batch_size: int | str = 1, **unused: Any) -> None:
        super().__init__()
        from namm_transfer import NAMM
        from namm_transfer.policies import FULL_CACHE, NAMM_NAME, build_policy

        if int(batch_size) != 1:
            raise ValueError(f"{MODEL_ID} runs one video at a time: batch_size must be 1, got {batch_size}")
        if model is None and loader is None:
            raise ValueError(f"{MODEL_ID} needs model=<video model> or loader=<module:function>")
        self.video_model = load_video_model(model or "", loader, device, parse_dtype(dtype))
        self.num_frames = _optional(num_frames, int) or self.video_model.num_frames or 32
        self.update_every = int(update_every)
        self.max_new_tokens = int(max_new_tokens)
        self.system, self.answer_prefix = system, answer_prefix
        budget = _optional(budget, int)
        loaded = None
        if policy == NAMM_NAME:
            loaded = NAMM.from_pretrained(namm).replace(update_every=self.update_every)
            if (head_mix := _optional(head_mix, float)) is not None:
                loaded = loaded.replace(head_mix=head_mix)
            if budget is not None:
                loaded = loaded.with_budget(budget)
        if policy not in (NAMM_NAME, FULL_CACHE) and budget is None:
            raise ValueError(f"{MODEL_ID}: the baseline {policy!r} needs budget=<tokens per layer, KV head>")
        self.policy_name = policy
        self.policy = build_policy(policy, loaded, budget, self.update_every, int(seed))
        self.last_stats: dict[str, Any] | None = None  # the last request's handle.stats()

    def _prompt(self, context: str, n_frames: int) -> torch.Tensor:
        from namm_transfer.adapters import video_layout
        from namm_transfer.pipelines.video.io import build_prompt, encode_video_prompt

        model = self.video_model.model
        text = build_prompt(model.config.model_type, context, system=self.system,
                            answer_prefix=self.answer_prefix)
        ids = encode_video_prompt(self.video_model.tokenizer, text, video_layout(model), n_frames)
        return torch.tensor([ids], device=model.device)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        from namm_transfer.pipelines.video.io import read_frames

        model = self.video_model.model
        answers = []
        for request in tqdm(requests, desc=f"{MODEL_ID} ({self.policy_name})", disable=len(requests) < 2):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id])
            if not visuals or not isinstance(visuals[0], str):
                raise ValueError(f"{MODEL_ID}: task {task!r} doc {doc_id} gives no video path ({visuals!r})")
            frames = read_frames(visuals[0], num_frames=self.num_frames)
            pixels = self.video_model.preprocessor(frames)[None].to(device=model.device, dtype=model.dtype)
            max_new = int((gen_kwargs or {}).get("max_new_tokens", self.max_new_tokens))
            text, self.last_stats, _ = generate_with_policy(
                self.video_model, self._prompt(context, len(frames)), pixels, self.policy, self.update_every,
                max_new,
            )
            for stop in (gen_kwargs or {}).get("until", []) or []:
                if isinstance(stop, str) and stop and stop in text:
                    text = text.split(stop)[0]
            answers.append(text)
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(f"{MODEL_ID} supports generation tasks only (output_type: generate_until)")

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(f"{MODEL_ID} supports single-turn generation tasks only")


MANIFEST = ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.NAMMTransferVideo",
                         aliases=("namm-transfer",))
