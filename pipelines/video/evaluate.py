"""``namm-transfer eval-video``: multiple-choice video QA with a zero-shot NAMM and the baselines.

Config -> annotations -> model -> policies -> rows -> summary:

1. **Annotations** in one of three formats, normalised to :class:`VideoQASample` by
   :func:`load_annotations` (``format="auto"`` tells them apart):

   - ``mlvu``: MLVU's published per-task JSON files (``MLVU/json/1_plotQA.json`` ...), a list of
     ``{"video": "x.mp4", "duration": ..., "question": ..., "candidates": [...], "answer": "<text of the
     right candidate>", "question_type": ...}``; the annotation path may be one file or the ``json``
     folder (entries without ``candidates``, the open-ended ``8_sub_scene`` / ``9_summary``, are
     skipped). Videos: ``VIDEOS/<file stem>/x.mp4`` (the published ``MLVU/video/1_plotQA/`` layout),
     else ``VIDEOS/<question_type>/x.mp4``, else ``VIDEOS/x.mp4``; VIDEOS defaults to the ``video``
     folder beside ``json``. Task type: ``question_type`` (else the file stem without its number).
   - ``longvideobench``: LongVideoBench's ``lvb_val.json``, a list of ``{"id", "video_path",
     "question", "candidates", "correct_choice": <int>, "question_category", "duration_group", ...}``;
     subtitles are ignored. Videos: ``VIDEOS/<video_path>``, VIDEOS defaulting to ``videos/`` beside
     the JSON. Task type: ``question_category`` (``duration_group`` is kept in ``meta``).
   - ``jsonl``: the generic format (what ``make-video-qa`` writes), read by
     :func:`~namm_transfer.pipelines.video.qa.load_video_qa` (see :mod:`~namm_transfer.pipelines.video.qa`);
     VIDEOS defaults to the file's folder (or its ``videos/`` subfolder, where the video is found there).

2. **Model**: a LLaVA-NeXT-Video, LLaVA-OneVision or Video-LLaVA model with its tokenizer (frames
   prepared by :class:`~namm_transfer.pipelines.video.io.VideoPreprocessor`, never a transformers
   processor, which would need torchvision), from (first that applies, see :func:`load_video_model`):
   a loader callable (``loader=`` in Python, ``--loader module:function`` on the command line)
   returning ``(model, tokenizer)`` or a :class:`VideoModel`; a small video model trained here by
   ``train-video-model`` (a shipped short name or its directory, with its own frame count,
   preprocessing and prompt format from ``video_model.json``); a ``from_pretrained`` directory
   (offline; ``AutoModelForImageTextToText`` + ``AutoTokenizer``).

3. **Policies**, each on every sample, prompt fed in chunks of ``update_every`` tokens (so eviction
   happens while the video streams in), greedy decoding:

   - ``FullCache``: nothing evicted;
   - ``NAMM``: the text-evolved NAMM zero-shot, cadence ``update_every`` (its query window the same);
   - ``Recency``, ``H2O``, ``L2Norm``, ``RandomEviction`` at the NAMM's measured per-layer budget (its
     mean kept tokens per layer at the end of each sample, less the tokens added since its last
     update, averaged over samples: as in ``eval-text`` and ``eval-rollout``) and the same cadence;
   - ``UniformFrames``: the frame-level baseline: a uniform subset of the sampled frames
     (``round(NAMM's mean kept video tokens / tokens per frame)`` of the ``num_frames``), fed to a
     full cache, so the model holds as many video tokens as the NAMM kept on average.

Scoring: :func:`~namm_transfer.pipelines.video.qa.score_output`, the scorer ``train-video-model`` uses
too, reads the option letter from the generated text and compares it with the gold letter; accuracy
overall and per task type. Per row: kept video tokens (mean over layers and KV heads) and frames
(frames with at least one token cached, mean over layers), the kept share of each frame (mean over
layers), stored KV bytes, seconds (decoding the video included).

Results: ``rows.jsonl`` (one row per policy and sample, appended as each finishes; a rerun skips
finished rows, retries failed ones and refuses other settings, see ``setting.json``); a sample whose
video is missing or unreadable (:class:`~namm_transfer.pipelines.video.io.VideoReadError`) becomes a
failed row with the error and the run goes on; ``summary.md`` / ``summary.json`` (command, git
revision, the budget); TensorBoard logs and layer x frame retention heatmaps (PNG) of the first
``heatmaps`` samples of each policy under ``heatmaps/``.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from namm_transfer.pipelines.common import (
    log,
    markdown_table,
    open_tensorboard,
    parse_dtype,
    run_metadata,
    set_threads,
)
from namm_transfer.pipelines.harness import (
    RowStore,
    check_fractions,
    check_setting,
    matched_budget,
    mean_se,
    namm_budget,
    parse_shard,
    shard_rows_name,
    verdict,
    write_summary,
)
from namm_transfer.pipelines.joint_probe import PROBES, FixedScoreTopK, JointProbe, cache_joint_scores
from namm_transfer.pipelines.video.annotations import FORMATS, load_annotations
from namm_transfer.pipelines.video.loading import VideoModel, load_video_model
from namm_transfer.pipelines.video.qa import (
    POST_PROMPT,
    VideoQASample,
    format_question,
    score_output,
)
from namm_transfer.policies import MemoryPolicy
from namm_transfer.policies.registry import BASELINES, FULL_CACHE, NAMM_NAME, build_policy, policy_names

ROWS_NAME, SUMMARY_NAME = "rows.jsonl", "summary"
UNIFORM = "UniformFrames"  # the frame-level baseline: a full cache over fewer, uniformly spaced frames
PROTOCOLS = ("progressive", "one-shot")
ONE_SHOT_CADENCE = 1 << 40  # never reached: a one-shot policy updates once, when first over its cap


def video_policies() -> list[str]:
    """What ``eval-video`` runs, in order: every registered policy, then uniform frame subsampling."""
    return [*policy_names(), UNIFORM]


def budget_label(name: str, fraction: float, protocol: str = "progressive") -> str:
    """``NAMM @ 15%``, ``H2O @ 15% one-shot``; UniformFrames has no protocol (a full cache)."""
    label = f"{name} @ {100 * fraction:g}%"
    return label if protocol == "progressive" or name == UNIFORM else f"{label} one-shot"


def budget_runs(cfg: EvalVideoConfig) -> list[tuple[str, str, float, str]]:
    """``(label, policy, fraction, protocol)`` of every capped run, per protocol and budget."""
    runs = []
    for protocol in cfg.protocols:
        for fraction in cfg.budgets:
            for name in [NAMM_NAME, *BASELINES, UNIFORM]:
                if name not in cfg.policies or (name == UNIFORM and protocol != cfg.protocols[0]):
                    continue
                runs.append((budget_label(name, fraction, protocol), name, fraction, protocol))
            if protocol == "one-shot":
                for name in probe_paths(cfg):
                    runs.append((budget_label(name, fraction, protocol), name, fraction, protocol))
    return runs


def probe_paths(cfg: EvalVideoConfig) -> dict[str, str]:
    """``{policy name: path}`` of ``cfg.joint_probe``'s probes.

    Raises:
        ValueError: two probes of the same kind (their rows would share a name).
    """
    out: dict[str, str] = {}
    for path in cfg.joint_probe:
        name = JointProbe.load(path).name
        if name in out:
            raise ValueError(f"{out[name]} and {path} are both {name}s: pass one probe of each kind")
        out[name] = path
    return out


def video_end(ids: list[int], video_token_id: int) -> int:
    """The position right after the prompt's last video token (where one-shot compression happens)."""
    where = [i for i, t in enumerate(ids) if t == video_token_id]
    if not where:
        raise ValueError("the prompt holds no video token")
    return where[-1] + 1


def video_cap(fraction: float, video_tokens: int, text_tokens: int) -> int:
    """Tokens per layer and KV head every capped run keeps: ``fraction`` of the video tokens (at least
    one) plus the ``text_tokens`` the protocol holds besides them."""
    return max(1, round(fraction * video_tokens)) + text_tokens


def capped_policy(name: str, namm, fraction: float, protocol: str, ids: list[int], video_tokens: int,
                  video_token_id: int, update_every: int, seed: int = 0):
    """The policy, prefill chunk and ``{"cap", "video_end"}`` of one capped run on one prompt.

    Cap per layer and KV head: ``round(fraction * video_tokens)`` plus the prompt's text tokens (all of
    them for ``progressive``, those before the video's end for ``one-shot``), the same for every policy;
    the NAMM keeps the top-k of its scores (no threshold). ``one-shot``: the prompt up to the video's end
    is one chunk, after which the cache holds more than the cap and the policy's first update compresses
    it (see :meth:`~namm_transfer.memory.LayerMemory.due`); its cadence is never reached after that."""
    end = video_end(ids, video_token_id)
    if protocol == "one-shot":
        every, chunk, text = ONE_SHOT_CADENCE, end, end - video_tokens
    else:
        every, chunk, text = update_every, update_every, len(ids) - video_tokens
    cap = video_cap(fraction, video_tokens, text)
    info = {"cap": cap, "video_end": end}
    if name == NAMM_NAME:
        return namm.replace(update_every=every).with_budget(cap, keep_threshold=False), chunk, info
    return build_policy(name, namm, cap, every, seed), chunk, info


# -------------------------------------------------------------------------------------------------
# one sample under one policy


@dataclass
class EvalVideoConfig:
    """Settings of :func:`run_eval_video`.

    Attributes:
        annotations: an MLVU JSON file or ``json`` folder, LongVideoBench's ``lvb_val.json``, or a generic
            JSONL file.
        videos: the videos folder (default: per format, see the module doc).
        format: ``auto``, ``mlvu``, ``longvideobench`` or ``jsonl``.
        model: a LLaVA video model directory, or a name the loader understands.
        loader: ``package.module:function`` returning ``(model, tokenizer)`` or a ``VideoModel``
            (default: ``from_pretrained`` on the directory).
        namm: a shipped NAMM's short name, a directory or a Hub id.
        namm_budget: optional hard cap on the tokens the NAMM keeps per layer and KV head (it still
            evicts every token it scores below 0, and keeps the top ``namm_budget`` of the rest by
            score); None: the NAMM as evolved (no cap).
        namm_sinks: the NAMM always keeps each prompt's first ``namm_sinks`` tokens (attention sinks,
            :attr:`~namm_transfer.NAMMConfig.sink_tokens`); 0: the NAMM as evolved.
        namm_head_mix: a joint NAMM's :attr:`~namm_transfer.NAMMConfig.head_mix` (each KV head ranks by
            the joint score plus this much of its own term, so the heads keep different tokens; 0: every
            head the same tokens); None: the NAMM's own setting.
        update_every: tokens between policy updates (NAMM and baselines) and the prefill chunk.
        num_frames: frames sampled uniformly from each video (None: the frame count the model was
            trained with when it says, else 32).
        policies: which of :func:`video_policies` to run (the baselines need the NAMM's rows).
        budgets: fixed budgets as fractions of the video tokens, e.g. 0.15 0.25 0.35 0.5: the NAMM (top-k
            of its scores) and every token baseline of ``policies`` also run capped at
            ``round(fraction * video tokens)`` plus the prompt's text tokens per layer and KV head, and
            UniformFrames on ``round(fraction * frames)`` frames; rows are labelled ``<policy> @ <pct>%``
            (``... one-shot`` for that protocol). Empty: only the NAMM's own budget.
        protocols: how the capped rows of ``budgets`` evict: ``progressive`` (every ``update_every``
            tokens while the prompt streams in, question and answer included) and/or ``one-shot`` (the
            prompt up to the video's end in one chunk, one eviction there, none after: the question is
            never compressed).
        shared_prefill: one-shot runs of a sample share one prefill of the prompt up to the video's end
            (:func:`one_shot_sample`); False feeds each run's prompt itself (two chunks).
        joint_probe: probes written by ``bench evidence`` (``joint_probe.pt``, ``pooled_probe.pt``;
            fitted on text): each adds ``<its name> @ <pct>% one-shot`` rows at every budget, a ranking
            that reads the NAMM's features of every layer-head at once
            (:mod:`~namm_transfer.pipelines.joint_probe`; one-shot, shared prefill only). A side-by-side
            probe needs the model to have its layers and KV heads; a pooled one fits any model.
        own_budget: also run the token baselines and UniformFrames at the NAMM's own measured budget
            (False: only at ``budgets``).
        limit: evaluate only the first ``limit`` samples (None: all).
        shard: ``"K/N"``: this process answers every N-th sample from K (parallel processes share the
            output folder; each appends to its own ``rows.shardKofN.jsonl`` and reads them all, so the
            last one to finish, or a rerun with ``0/1``, writes the complete summary). Baselines at the
            NAMM's own budget take it from the NAMM rows of their shard: prefer ``budgets`` there.
        max_new_tokens: greedy generation length.
        post_prompt: line after the options (default: answer with the letter).
        answer_prefix: text after the assistant marker, e.g. ``"Best option: ("``.
        exact_output: attach with ``exact_output=True`` (a keep-all policy reproduces the full cache bit
            for bit; one more attention product per layer).
        heatmaps: retention heatmaps (PNG + TensorBoard) for the first this many samples per policy.
        seed: RandomEviction's seed.
        output_dir: rows.jsonl, summary (.md, .json), heatmaps/, tensorboard/.
        device: torch device, e.g. ``cpu`` or ``cuda``.
        dtype: model dtype (float32 is fastest on CPU).
        threads: torch intra-op threads (None: torch's choice; 1 is best beside a busy process).
    """

    annotations: str = ""
    videos: str | None = None
    format: str = "auto"
    model: str | None = None
    loader: str | None = None
    namm: str = "smollm2-text"
    namm_budget: int | None = None
    namm_sinks: int = 0
    namm_head_mix: float | None = None
    update_every: int = 256
    num_frames: int | None = None
    policies: list[str] = field(default_factory=video_policies)
    budgets: list[float] = field(default_factory=list)
    protocols: list[str] = field(default_factory=lambda: ["progressive"])
    own_budget: bool = True
    shared_prefill: bool = True
    joint_probe: list[str] = field(default_factory=list)
    limit: int | None = None
    shard: str = "0/1"
    max_new_tokens: int = 8
    post_prompt: str = POST_PROMPT
    answer_prefix: str = ""
    exact_output: bool = False
    heatmaps: int = 3
    seed: int = 0
    output_dir: str = "runs/eval_video"
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.policies) - set(video_policies()))
        if unknown:
            raise ValueError(f"unknown policies {unknown}; choose from {video_policies()}")
        if self.format not in FORMATS:
            raise ValueError(f"unknown annotation format {self.format!r}; choose from {FORMATS}")
        if self.update_every < 1 or self.max_new_tokens < 1 or (self.num_frames or 1) < 1:
            raise ValueError("update_every, num_frames and max_new_tokens must be >= 1")
        parse_shard(self.shard)
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {self.limit}")
        check_fractions(self.budgets, "fractions of the video tokens")
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad or not self.protocols:
            raise ValueError(f"unknown protocol(s) {bad or self.protocols}; "
                             f"choose from {', '.join(PROTOCOLS)}")
        if self.namm_sinks < 0:
            raise ValueError(f"namm_sinks must be >= 0, got {self.namm_sinks}")
        if self.namm_head_mix is not None and not self.namm_head_mix >= 0:
            raise ValueError(f"namm_head_mix must be >= 0 or None, got {self.namm_head_mix}")
        if self.joint_probe and not (
            self.budgets and "one-shot" in self.protocols and self.shared_prefill
        ):
            raise ValueError("joint_probe runs one-shot from the shared prefill: it needs budgets, the "
                             "one-shot protocol and shared_prefill")
        if self.namm_budget is not None and self.namm_budget < 1:
            raise ValueError(f"namm_budget must be >= 1 token per layer and KV head, got {self.namm_budget}")


def check_prompt_options(video_model: VideoModel, post_prompt: str, answer_prefix: str) -> None:
    """Refuse prompt options the model would ignore: a model with its own prompt builder (a
    ``train-video-model`` model's ``video_model.json``) writes the whole prompt itself.

    Raises:
        ValueError: ``answer_prefix`` set, or ``post_prompt`` changed, for such a model."""
    if video_model.prompt_builder is None:
        return
    ignored = [name for name, given, default in (("answer_prefix", answer_prefix, ""),
                                                 ("post_prompt", post_prompt, POST_PROMPT))
               if given != default]
    if ignored:
        raise ValueError(f"this video model builds its own prompts (the prompt builder of its "
                         f"video_model.json), so {' and '.join(ignored)} would be ignored; leave "
                         f"{'them' if len(ignored) > 1 else 'it'} at the default")


def prompt_ids(video_model: VideoModel, sample: VideoQASample, num_frames: int, post_prompt: str,
               answer_prefix: str) -> list[int]:
    """The sample's prompt with the family's chat format and its run of video tokens."""
    from namm_transfer.adapters import video_layout
    from namm_transfer.pipelines.video.io import build_prompt, encode_video_prompt

    model = video_model.model
    layout = video_layout(model)
    if video_model.prompt_builder is not None:
        text = video_model.prompt_builder(sample)
    else:
        question = (video_model.format_question(sample) if video_model.format_question is not None
                    else format_question(sample.question, sample.options, post_prompt, one_per_line=True))
        prefix = video_model.answer_prefix if video_model.answer_prefix is not None else answer_prefix
        text = build_prompt(model.config.model_type, question, system=video_model.system,
                            answer_prefix=prefix)
    return encode_video_prompt(video_model.tokenizer, text, layout, num_frames)


def _kept_video(retention: np.ndarray, tokens_per_frame: int) -> tuple[float, float]:
    """Mean over layers of the video tokens still cached, and of the frames with any token cached."""
    retention = np.nan_to_num(np.asarray(retention, dtype=np.float64), nan=0.0)
    tokens = float((retention.sum(axis=1) * tokens_per_frame).mean())
    frames = float((retention > 0).sum(axis=1).mean())
    return tokens, frames


@torch.no_grad()
def generate_with_policy(video_model: VideoModel, ids: torch.Tensor, pixels: torch.Tensor, policy, chunk: int,
                         max_new_tokens: int, exact_output: bool = False, layout: Any = None):
    """Greedy answer to one video prompt (``ids`` ``[1, T]``, ``pixels`` the video's
    ``pixel_values_videos``) with ``policy`` attached, the prompt fed in chunks of ``chunk`` tokens.

    Returns the decoded text, ``handle.stats()`` and, when ``layout`` (the model's video layout) is
    given, the ``[layers, frames]`` retention of each frame's tokens (else None).
    """
    from namm_transfer.adapters import attach, frame_map

    model, tokenizer = video_model.model, video_model.tokenizer
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    with attach(model, policy, prefill_chunk=chunk, exact_output=exact_output) as handle:
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=pixels,
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
        )
        stats = handle.stats()
        retention = None if layout is None else handle.frame_retention(frame_map(ids.cpu(), layout))
    text = tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True).strip()
    return text, stats, retention


def evaluate_sample(video_model: VideoModel, sample: VideoQASample, policy, num_frames: int, chunk: int,
                    max_new_tokens: int, post_prompt: str = POST_PROMPT, answer_prefix: str = "",
                    frame_subset: int | None = None, exact_output: bool = False) -> tuple[dict, np.ndarray]:
    """Answer one sample under one policy.

    Reads ``num_frames`` frames uniformly; with ``frame_subset = k`` keeps a uniform subset of ``k`` of
    them (the frame-level baseline). ``policy`` may also be a callable ``ids -> (policy, chunk, info)``
    for a policy that depends on the prompt (a budget in tokens, the one-shot cadence); ``info`` joins
    the row. Returns the row (without ``policy``) and the ``[layers, num_frames]`` retention (a dropped
    frame's column is 0).

    Raises:
        VideoReadError: the video is missing or cannot be decoded.
    """
    from namm_transfer.adapters import video_layout
    from namm_transfer.pipelines.video.io import read_frames, uniform_indices

    model = video_model.model
    layout = video_layout(model)
    start = time.perf_counter()
    frames = read_frames(sample.video_path, num_frames=num_frames)
    chosen = np.arange(num_frames)
    if frame_subset is not None and frame_subset < num_frames:
        chosen = uniform_indices(num_frames, frame_subset)
        frames = frames[chosen]
    n_frames = len(frames)
    pixels = video_model.preprocessor(frames)[None].to(device=model.device, dtype=model.dtype)
    ids = torch.tensor([prompt_ids(video_model, sample, n_frames, post_prompt, answer_prefix)],
                       device=model.device)
    info = {}
    if not isinstance(policy, MemoryPolicy):
        policy, chunk, info = policy(ids[0].tolist())
    prepared = time.perf_counter()
    text, stats, retention = generate_with_policy(video_model, ids, pixels, policy, chunk, max_new_tokens,
                                                  exact_output, layout)
    generated = time.perf_counter()
    row, full_retention = answer_row(sample, text, stats, retention, chosen, int(ids.shape[1]), layout,
                                     num_frames)
    row.update(prepare_seconds=prepared - start, generate_seconds=generated - prepared,
               seconds=time.perf_counter() - start, **info)
    return row, full_retention


def failed_row(sample: VideoQASample, error: Exception, seconds: float) -> dict[str, Any]:
    """The row of a sample whose video could not be read (retried on the next run)."""
    return {"sample_id": sample.sample_id, "task_type": sample.task_type, "video": sample.video,
            "answer": sample.answer, "failed": True, "error": str(error), "seconds": seconds}


def answer_row(sample: VideoQASample, text: str, stats: dict[str, Any], retention: np.ndarray,
               chosen: np.ndarray, prompt_tokens: int, layout: Any,
               num_frames: int) -> tuple[dict, np.ndarray]:
    """The row of one answer (scored, with what its cache kept; no timings) and the ``[layers,
    num_frames]`` retention (frames not fed are 0)."""
    n_frames = len(chosen)
    predicted, correct = score_output(text, sample)
    full_retention = np.zeros((retention.shape[0], num_frames))
    full_retention[:, chosen] = np.nan_to_num(retention[:, :n_frames], nan=0.0)
    kept_tokens, kept_frames = _kept_video(retention[:, :n_frames], layout.tokens_per_frame)
    frame_tokens = num_frames * layout.tokens_per_frame  # OneVision's newline belongs to no frame
    row = {
        "sample_id": sample.sample_id,
        "task_type": sample.task_type,
        "video": sample.video,
        "answer": sample.answer,
        "output": text,
        "predicted": predicted,
        "correct": correct,
        "failed": False,
        "frames": n_frames,
        "frame_indices": chosen.tolist(),
        "prompt_tokens": prompt_tokens,
        "video_tokens": layout.video_tokens(n_frames),
        "kept_video_tokens": kept_tokens,
        "kept_video_fraction": kept_tokens / frame_tokens,
        "kept_frames": kept_frames,
        "frame_retention": full_retention.mean(axis=0).tolist(),
        "kept_fraction": stats["kept_fraction"],
        "kept_per_layer": [float(np.mean(layer)) for layer in stats["kept_tokens_per_layer"]],
        "since_update": stats["tokens_since_update_per_layer"],
        "stored_kv_bytes": int(stats["stored_kv_bytes"]),
        "full_kv_bytes": int(stats["full_kv_bytes"]),
        "evictions": int(stats["evictions"]),
        "nonfinite": int(stats["nonfinite"]),
    }
    return row, full_retention


@torch.no_grad()
def one_shot_sample(video_model: VideoModel, sample: VideoQASample, runs: list[tuple[str, str, float]], namm,
                    num_frames: int, max_new_tokens: int, post_prompt: str = POST_PROMPT,
                    answer_prefix: str = "", seed: int = 0,
                    probes: dict[str, JointProbe] | None = None) -> list[tuple[str, dict, np.ndarray]]:
    """Every one-shot run of one sample from one shared prefill.

    Until the one-shot eviction at the video's end nothing depends on the policy, so the prompt up to
    there is fed once, with a :class:`~namm_transfer.pipelines.text.shared_prefill.Tee` recording every
    policy's state (the NAMM's spectrogram, H2O's sums, ...); each run ``(label, policy name, fraction)``
    then forks that cache, compressed by its own policy at its cap (:func:`capped_policy`), and decodes
    the question and answer. Returns ``(label, row, retention)`` per run, rows as
    :func:`evaluate_sample`'s (``seconds`` = the shared part + the run's own). Runs of
    a probe's name (:data:`~namm_transfer.pipelines.joint_probe.PROBES`) keep, at the same cap, the
    top of that probe's joint ranking (``probes[name]``,
    :func:`~namm_transfer.pipelines.joint_probe.cache_joint_scores`).

    Raises:
        VideoReadError: the video is missing or cannot be decoded.
        ValueError: a probe's run without that probe in ``probes``.
    """
    from types import SimpleNamespace

    from namm_transfer.adapters import attach, frame_map, video_layout
    from namm_transfer.pipelines.text.shared_prefill import generate_answer, prefill_context
    from namm_transfer.pipelines.video.io import read_frames

    model, tokenizer = video_model.model, video_model.tokenizer
    layout = video_layout(model)
    start = time.perf_counter()
    frames = read_frames(sample.video_path, num_frames=num_frames)
    pixels = video_model.preprocessor(frames)[None].to(device=model.device, dtype=model.dtype)
    ids = prompt_ids(video_model, sample, num_frames, post_prompt, answer_prefix)
    video_tokens = layout.video_tokens(num_frames)
    end = video_end(ids, layout.video_token_id)
    names = list(dict.fromkeys(name for _, name, _ in runs))
    if any(n in PROBES for n in names):
        missing = [n for n in names if n in PROBES and n not in (probes or {})]
        if missing:
            raise ValueError(f"runs of {missing} need those probes")
        names = list(dict.fromkeys([NAMM_NAME, *(n for n in names if n not in PROBES)]))  # reads the NAMM's
    recorded = [namm if name == NAMM_NAME else build_policy(name, namm, None, ONE_SHOT_CADENCE, seed)
                for name in names]
    fmap = frame_map(torch.tensor([ids]), layout)
    out = []
    with attach(model, namm) as handle:
        prefill = prefill_context(model, handle, SimpleNamespace(prompt_ids=ids), tokenizer, recorded,
                                  context_len=end, inputs={"pixel_values_videos": pixels})
        joint = {name: cache_joint_scores(prefill.cache, namm, probe, names.index(NAMM_NAME))
                 for name, probe in (probes or {}).items() if any(run[1] == name for run in runs)}
        shared = time.perf_counter() - start
        for label, name, fraction in runs:
            t0 = time.perf_counter()
            base = NAMM_NAME if name in PROBES else name
            policy, _, info = capped_policy(base, namm, fraction, "one-shot", ids, video_tokens,
                                            layout.video_token_id, ONE_SHOT_CADENCE, seed)
            if name in PROBES:
                policy = FixedScoreTopK(joint[name], info["cap"])
            cache = prefill.fork(names.index(base), policy)
            text = generate_answer(model, tokenizer, prefill, cache, max_new_tokens)
            row, retention = answer_row(sample, text, handle.stats(), handle.frame_retention(fmap),
                                        np.arange(num_frames), len(ids), layout, num_frames)
            row.update(prepare_seconds=shared, generate_seconds=time.perf_counter() - t0,
                       seconds=shared + time.perf_counter() - t0, shared_prefill=True, **info)
            out.append((label, row, retention))
    return out


# -------------------------------------------------------------------------------------------------
# budgets, rows, summary


def uniform_frame_count(rows: list[dict[str, Any]], tokens_per_frame: int, num_frames: int) -> int:
    """Frames for the frame-level baseline: the NAMM's mean kept video tokens in whole frames
    (rounded, between 1 and ``num_frames``)."""
    ok = [r for r in rows if not r.get("failed")]
    if not ok:
        raise ValueError("the NAMM has no successful sample to measure its kept video tokens on")
    tokens = float(np.mean([r["kept_video_tokens"] for r in ok]))
    return int(min(num_frames, max(1, round(tokens / tokens_per_frame))))


def _setting(cfg: EvalVideoConfig) -> dict[str, Any]:
    # budgets / protocols label their own rows
    return {"annotations": str(cfg.annotations), "videos": cfg.videos, "format": cfg.format,
            "model": str(cfg.model), "loader": cfg.loader, "namm": str(cfg.namm),
            "update_every": cfg.update_every, "num_frames": cfg.num_frames, "limit": cfg.limit,
            "max_new_tokens": cfg.max_new_tokens, "post_prompt": cfg.post_prompt,
            "answer_prefix": cfg.answer_prefix, "exact_output": cfg.exact_output, "seed": cfg.seed,
            "dtype": cfg.dtype, "namm_budget": cfg.namm_budget,
            "namm_sinks": cfg.namm_sinks, "namm_head_mix": cfg.namm_head_mix}


def key_frame_retention(rows: list[dict[str, Any]], key_frames: dict[str, list[int]]) -> tuple[float, float]:
    """Mean share of the tokens still cached of the frames that hold the answer, and of the other
    (redundant) frames, over the ``rows`` whose sample has known ``key_frames`` (NaN if none)."""
    key, other = [], []
    for row in rows:
        frames = key_frames.get(row["sample_id"])
        if not frames:
            continue
        retention = np.asarray(row["frame_retention"], dtype=np.float64)
        is_key = np.zeros(retention.size, dtype=bool)
        is_key[frames] = True
        key.append(retention[is_key].mean())
        other.append(retention[~is_key].mean())
    return (float(np.mean(key)), float(np.mean(other))) if key else (float("nan"), float("nan"))


def summarise(rows: list[dict[str, Any]], task_types: list[str],
              key_frames: dict[str, list[int]] | None = None,
              order: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Per policy label (in ``order``, default :func:`video_policies` order): accuracy (± standard error)
    overall and per task type, failures, kept video tokens / frames, stored KV MiB and seconds per sample
    (successful samples); with ``key_frames`` (sample id -> indices of the sampled frames that hold the
    answer, as make-video-qa records them) also the retention of those frames against the others."""
    summary: dict[str, dict[str, Any]] = {}
    for name in [p for p in (order or video_policies()) if any(r["policy"] == p for r in rows)]:
        mine = [r for r in rows if r["policy"] == name]
        ok = [r for r in mine if not r.get("failed")]
        acc, se = mean_se([float(r["correct"]) for r in ok])
        per_task = {}
        for task in task_types:
            scores = [float(r["correct"]) for r in ok if r["task_type"] == task]
            per_task[task] = {"accuracy": mean_se(scores)[0], "n": len(scores)}

        def mean(key, rows=ok):
            return float(np.mean([r[key] for r in rows])) if rows else float("nan")

        summary[name] = {
            "samples": len(mine),
            "failed": len(mine) - len(ok),
            "accuracy": acc,
            "accuracy_se": se,
            "per_task": per_task,
            "frames": mean("frames"),
            "kept_video_tokens": mean("kept_video_tokens"),
            "kept_video_fraction": mean("kept_video_fraction"),
            "kept_frames": mean("kept_frames"),
            "kept_fraction": mean("kept_fraction"),
            "stored_kv_mib": mean("stored_kv_bytes") / 2**20,
            "seconds_per_sample": mean("seconds"),
            "seconds_median": float(np.median([r["seconds"] for r in ok])) if ok else float("nan"),
            "generate_seconds_per_sample": mean("generate_seconds"),
            "unanswered": sum(1 for r in ok if r.get("predicted") is None),
        }
        if mine and "budget_fraction" in mine[0]:
            summary[name].update(policy=mine[0]["base_policy"], budget_fraction=mine[0]["budget_fraction"],
                                 protocol=mine[0]["protocol"])
        if key_frames:
            key, other = key_frame_retention(ok, key_frames)
            summary[name].update(key_frame_retention=key, other_frame_retention=other)
    return summary


def budget_tables(summary: dict[str, dict[str, Any]], full: dict[str, Any] | None) -> str:
    """One table per (protocol, budget) of the capped rows, the full cache's accuracy beside each row:
    the matched-budget comparisons, with every policy's answer / redundant frames' retention."""
    groups: dict[tuple[str, float], dict[str, dict[str, Any]]] = {}
    for label, s in summary.items():
        if "budget_fraction" not in s:
            continue
        protocols = [s["protocol"]] if s["policy"] != UNIFORM else \
            sorted({t["protocol"] for t in summary.values() if "protocol" in t}, key=PROTOCOLS.index)
        for protocol in protocols:
            groups.setdefault((protocol, s["budget_fraction"]), {})[label] = s
    out = []
    for (protocol, fraction), members in sorted(groups.items(),
                                                key=lambda g: (PROTOCOLS.index(g[0][0]), g[0][1])):
        ranked = dict(sorted(members.items(), key=lambda kv: -kv[1]["accuracy"]))
        table, _ = summary_tables(ranked, [])
        head = f"### {protocol}, {100 * fraction:g}% of the video tokens\n\n"
        if full is not None and full["accuracy"] > 0:
            ratios = ", ".join(f"{s['policy']} {s['accuracy'] / full['accuracy']:.2f}"
                               for s in ranked.values())
            head += (f"Full cache: {full['accuracy']:.3f} ± {full['accuracy_se']:.3f}; "
                     f"accuracy / full cache's: {ratios}.\n\n")
        out.append(head + table + verdict_line({s["policy"]: s for s in ranked.values()}))
    return "\n\n".join(out)


def verdict_line(table: dict[str, dict[str, Any]]) -> str:
    """Below a matched-budget table (keyed by policy name): is the NAMM above every baseline (the token
    baselines and uniform frames; probes are not baselines), and by more than their combined standard
    error? Empty without a NAMM row or a baseline."""
    v = verdict(table, NAMM_NAME, PROBES, "accuracy", "accuracy_se")
    if not v:
        return ""
    best = v["best_baseline"]
    lead = v["margins"][best]
    return (f"\n\nNAMM above every baseline: {'yes' if v['above_every_baseline'] else 'no'}; by more than "
            f"the combined standard error: {'yes' if v['above_every_baseline_by_combined_se'] else 'no'} "
            f"(best baseline {best} {table[best]['accuracy']:.3f}; NAMM lead {lead['margin']:+.3f}, "
            f"combined s.e. {lead['combined_se']:.3f}).")


def summary_tables(summary: dict[str, dict[str, Any]], task_types: list[str]) -> tuple[str, str]:
    """The main table (one row per policy) and the per-task-type accuracy table."""
    with_keys = any("key_frame_retention" in s for s in summary.values())
    main = markdown_table(
        ["policy", "accuracy", "video tokens kept", "share of video tokens", "frames kept", "frames fed",
         *(["key / other frames' tokens kept"] if with_keys else []), "KV MiB", "s / sample", "failed"],
        [[name,
          f"{s['accuracy']:.3f} ± {s['accuracy_se']:.3f}",
          f"{s['kept_video_tokens']:.0f}",
          f"{s['kept_video_fraction']:.3f}",
          f"{s['kept_frames']:.1f}",
          f"{s['frames']:.0f}",
          *([f"{s.get('key_frame_retention', float('nan')):.3f} / "
             f"{s.get('other_frame_retention', float('nan')):.3f}"] if with_keys else []),
          f"{s['stored_kv_mib']:.2f}",
          f"{s['seconds_per_sample']:.2f}",
          str(s["failed"])] for name, s in summary.items()],
    )
    per_task = markdown_table(
        ["policy", *task_types],
        [[name, *(f"{s['per_task'][t]['accuracy']:.3f} (n={s['per_task'][t]['n']})" for t in task_types)]
         for name, s in summary.items()],
    )
    return main, per_task


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:80]


# -------------------------------------------------------------------------------------------------
# entry point


def run_eval_video(cfg: EvalVideoConfig, argv: list[str] | None = None, loader: Callable | None = None,
                   namm=None) -> dict[str, dict[str, Any]]:
    """Evaluate every policy of ``cfg.policies`` on the annotations; returns the summary per policy.

    ``loader`` (a callable, overriding ``cfg.loader``) and ``namm`` (a NAMM object, overriding
    ``cfg.namm``; its cadence is still set to ``cfg.update_every``) serve Python callers and tests.
    """
    from tqdm.auto import tqdm

    from namm_transfer.adapters import save_retention_heatmap, video_layout
    from namm_transfer.pipelines.video.io import VideoReadError

    if not cfg.annotations:
        raise ValueError("pass the annotations (--annotations): an MLVU JSON / folder, lvb_val.json or JSONL")
    if cfg.model is None and loader is None and cfg.loader is None:
        raise ValueError("pass the model (--model): a LLaVA video model directory or a loader's name")
    set_threads(cfg.threads)
    samples = load_annotations(cfg.annotations, cfg.videos, cfg.format)
    if cfg.limit is not None:
        samples = samples[: cfg.limit]
    if not samples:
        raise ValueError(f"{cfg.annotations}: no multiple-choice samples")
    task_types = list(dict.fromkeys(s.task_type for s in samples))
    all_samples = samples  # the summary covers every shard's rows
    all_ids = {s.sample_id for s in samples}
    shard, n_shards = parse_shard(cfg.shard)
    samples = samples[shard::n_shards]
    log(f"{len(samples)} samples{f' (shard {cfg.shard})' if n_shards > 1 else ''}, task types: "
        f"{', '.join(task_types)}")
    video_model = load_video_model(cfg.model or "", loader if loader is not None else cfg.loader,
                                   cfg.device, parse_dtype(cfg.dtype))
    check_prompt_options(video_model, cfg.post_prompt, cfg.answer_prefix)
    layout = video_layout(video_model.model)
    if cfg.num_frames is None:  # the model's own frame count
        cfg = dataclasses.replace(cfg, num_frames=video_model.num_frames or 32)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    setting = _setting(cfg)
    # results written before namm_budget existed were uncapped
    check_setting(out_dir, setting, assumed={"namm_budget": None, "namm_sinks": 0, "namm_head_mix": None})
    store = RowStore(out_dir / shard_rows_name(shard, n_shards, ROWS_NAME),
                     key=lambda r: (r["policy"], r["sample_id"]), shards="rows*.jsonl")
    writer = open_tensorboard(out_dir)
    namm_label = str(cfg.namm) if namm is None else f"{namm!r} (passed in by the caller)"
    if namm is None and any(p != FULL_CACHE for p in cfg.policies):
        from namm_transfer import NAMM

        namm = NAMM.from_pretrained(cfg.namm)
    if namm is not None:
        namm = namm.replace(update_every=cfg.update_every)
        if cfg.namm_sinks:
            namm = namm.replace(sink_tokens=cfg.namm_sinks)
            namm_label += f", its first {cfg.namm_sinks} tokens always kept (attention sinks)"
        if cfg.namm_head_mix is not None:
            namm = namm.replace(head_mix=cfg.namm_head_mix)
            namm_label += f", head_mix {cfg.namm_head_mix:g}"
        if cfg.namm_budget is not None:
            namm = namm.with_budget(cfg.namm_budget)
            namm_label += f", capped at {cfg.namm_budget} tokens per layer and KV head"

    budget, frames_k = None, None
    order = [p for p in video_policies() if p in cfg.policies
             and (cfg.own_budget or p not in (*BASELINES, UNIFORM))]
    rank_only = namm is not None and namm.config.threshold is None and namm.budget is None \
        and namm.compression_ratio is None
    if rank_only and NAMM_NAME in order:
        # a rank-only NAMM (no threshold, no cap) keeps everything uncapped: it has no operating point of
        # its own, so only its capped runs (and no own-budget baselines) mean anything
        if cfg.own_budget and any(p in (*BASELINES, UNIFORM) for p in order):
            raise ValueError(f"{namm_label} only ranks (threshold None): it has no budget of its own for the "
                             "baselines to match; pass --no-own-budget")
        log(f"{namm_label} only ranks (threshold None): no uncapped run, only the capped ones")
        order.remove(NAMM_NAME)
    ids = {s.sample_id for s in samples}
    video_tokens = layout.video_tokens(cfg.num_frames)

    def record(label: str, index: int, sample: VideoQASample, row: dict, retention) -> None:
        """Append one row (incremental: a kill loses at most this sample), its scalars and, for the
        first ``heatmaps`` samples, its retention heatmap."""
        row = store.add({"policy": label, **row})
        if writer is not None and not row["failed"]:
            writer.add_scalar(f"correct/{label}", float(row["correct"]), index)
            writer.add_scalar(f"kept_video_tokens/{label}", row["kept_video_tokens"], index)
        if retention is not None and index < cfg.heatmaps:
            title = f"{label}: {sample.sample_id} ({sample.task_type})"
            png = out_dir / "heatmaps" / f"{_safe(label)}_{index}_{_safe(sample.sample_id)}.png"
            save_retention_heatmap(retention, png, title)
            if writer is not None:  # the same picture, not drawn twice
                from PIL import Image

                image = np.asarray(Image.open(png).convert("RGB"))
                writer.add_image(f"retention/{label}/{index}", image, 0, dataformats="HWC")

    def run(label: str, policy, frame_subset: int | None = None, extra: dict | None = None) -> None:
        """Every pending sample under one policy (or prompt -> policy factory), rows appended."""
        todo = [(i, s) for i, s in enumerate(samples) if not store.done((label, s.sample_id))]
        if not todo:
            log(f"{label}: all {len(samples)} samples already done")
        for index, sample in tqdm(todo, desc=label, unit="sample"):
            start = time.perf_counter()
            try:
                row, retention = evaluate_sample(
                    video_model, sample, policy, cfg.num_frames, cfg.update_every, cfg.max_new_tokens,
                    cfg.post_prompt, cfg.answer_prefix, frame_subset, cfg.exact_output,
                )
            except VideoReadError as error:
                log(f"{label}: sample {sample.sample_id} failed: {error}")
                row, retention = failed_row(sample, error, time.perf_counter() - start), None
            record(label, index, sample, {**row, **(extra or {})}, retention)
        mine = store.rows(lambda r: r["policy"] == label and r["sample_id"] in ids and not r.get("failed"))
        if mine:
            kept = np.mean([r["kept_video_tokens"] for r in mine])
            log(f"{label}: accuracy {np.mean([r['correct'] for r in mine]):.3f}, kept video tokens "
                f"{kept:.0f} of {video_tokens}")

    for name in order:
        if name in (*BASELINES, UNIFORM) and budget is None:
            is_namm = lambda r: r["policy"] == NAMM_NAME and r["sample_id"] in ids  # noqa: E731
            budget = namm_budget(store, is_namm, len(samples), needed_by=name)
            frames_k = uniform_frame_count(store.rows(is_namm), layout.tokens_per_frame, cfg.num_frames)
            log(f"uniform frames: {frames_k} of {cfg.num_frames}")
        token_policy = FULL_CACHE if name == UNIFORM else name  # UniformFrames: a full cache, fewer frames
        policy = build_policy(token_policy, namm, budget, cfg.update_every, cfg.seed)
        run(name, policy, frames_k if name == UNIFORM else None,
            {"budget": budget} if name in BASELINES else None)

    capped = budget_runs(cfg)
    if capped:
        log(f"capped runs: {', '.join(f'{100 * f:g}%' for f in cfg.budgets)} of {video_tokens} video tokens, "
            f"protocols {', '.join(cfg.protocols)}")
    shared = [(label, name, fraction) for label, name, fraction, protocol in capped
              if protocol == "one-shot" and name != UNIFORM] if cfg.shared_prefill else []
    paths = probe_paths(cfg)
    probes = {name: JointProbe.load(path) for name, path in paths.items()}
    if probes:
        if namm is None:
            from namm_transfer import NAMM

            namm = NAMM.from_pretrained(cfg.namm).replace(update_every=cfg.update_every)
    if shared:
        pending = [(i, s) for i, s in enumerate(samples)
                   if any(not store.done((label, s.sample_id)) for label, *_ in shared)]
        for index, sample in tqdm(pending, desc="one-shot (shared prefill)", unit="sample"):
            todo = [run for run in shared if not store.done((run[0], sample.sample_id))]
            try:
                results = one_shot_sample(video_model, sample, todo, namm, cfg.num_frames, cfg.max_new_tokens,
                                          cfg.post_prompt, cfg.answer_prefix, cfg.seed, probes)
            except VideoReadError as error:
                log(f"one-shot: sample {sample.sample_id} failed: {error}")
                results = [(label, failed_row(sample, error, 0.0), None) for label, *_ in todo]
            for (label, name, fraction), (_, row, retention) in zip(todo, results, strict=True):
                probe_path = {"joint_probe": paths[name]} if name in paths else {}
                record(label, index, sample, {**row, "base_policy": name, "budget_fraction": fraction,
                                              "protocol": "one-shot", **probe_path}, retention)
    for label, name, fraction, protocol in capped:
        extra = {"base_policy": name, "budget_fraction": fraction, "protocol": protocol}
        if any(label == run[0] for run in shared):
            continue
        if name == UNIFORM:
            k = int(min(cfg.num_frames, max(1, round(fraction * cfg.num_frames))))
            run(label, build_policy(FULL_CACHE), k, extra)
            continue

        def factory(prompt, name=name, fraction=fraction, protocol=protocol):
            return capped_policy(name, namm, fraction, protocol, prompt, video_tokens, layout.video_token_id,
                                 cfg.update_every, cfg.seed)

        run(label, factory, None, extra)

    store.refresh()  # the other shards' rows written meanwhile
    rows = store.rows()
    labels = [*order, *(label for label, *_ in capped)]
    selected = [r for r in rows if r["policy"] in labels and r["sample_id"] in all_ids]
    # make-video-qa's records name the frames that hold the answer (indices among the sampled frames)
    key_frames = {s.sample_id: [int(k) for k in s.meta["key_frames"]] for s in all_samples
                  if s.meta.get("key_frames") and s.meta.get("num_frames") == cfg.num_frames}
    summary = summarise(selected, task_types, key_frames, labels)
    namm_rows = [r for r in rows if r["policy"] == NAMM_NAME and r["sample_id"] in all_ids]
    if budget is None and len(namm_rows) >= len(all_ids) and any(not r.get("failed") for r in namm_rows):
        budget = matched_budget(namm_rows)
        frames_k = uniform_frame_count(namm_rows, layout.tokens_per_frame, cfg.num_frames)
    if writer is not None:
        for name, s in summary.items():
            for key in ("accuracy", "kept_video_tokens", "kept_frames", "stored_kv_mib",
                        "seconds_per_sample"):
                writer.add_scalar(f"summary/{name}/{key}", s[key], 0)
        writer.close()
    meta = run_metadata(argv)
    uncapped = {k: v for k, v in summary.items() if "budget_fraction" not in v}
    main_table, _ = summary_tables(uncapped, task_types)
    _, task_table = summary_tables(summary, task_types)
    capped_tables = budget_tables(summary, summary.get(FULL_CACHE))
    data = {
        "config": asdict(cfg), "setting": setting, "meta": meta, "budget": budget,
        "uniform_frames": frames_k, "tokens_per_frame": layout.tokens_per_frame,
        "video_tokens": layout.video_tokens(cfg.num_frames), "task_types": task_types, "summary": summary,
    }
    write_summary(
        out_dir, data,
        f"# Video QA: {cfg.annotations}\n\n"
        f"- command: `{meta['command']}`\n- date: {meta['date']}, git {meta['git_revision']}\n"
        f"- model: {cfg.model} ({video_model.model.config.model_type}, {layout.tokens_per_frame} tokens per "
        f"frame), {cfg.num_frames} frames per video = {layout.video_tokens(cfg.num_frames)} video tokens\n"
        f"- samples: {len(all_samples)} ({', '.join(task_types)})\n"
        f"- NAMM: {namm_label}, zero-shot, update every {cfg.update_every} tokens (also the prefill chunk of "
        f"every policy)\n"
        f"- token baselines' per-layer budget: {budget}; UniformFrames: {frames_k} of {cfg.num_frames} "
        f"frames\n\n"
        "Accuracy: option letter extracted from the greedy answer, ± standard error over samples (failed "
        "samples excluded and counted apart). Video tokens / frames kept: at the end of generation, mean "
        "over layers and KV heads (a frame counts as kept while any of its tokens is cached); share of "
        "video tokens = kept / the full video's tokens. KV MiB: keys and values stored at the end. "
        "s / sample: wall time per sample, video decoding included."
        + (" Key / other frames' tokens kept: mean share of the tokens still cached (over layers) of the "
           "frames that hold the answer, and of the other, redundant frames (from the annotations' "
           "key_frames)." if key_frames else "")
        + "\n\n"
        + main_table
        + (f"\n\n## Matched budgets\n\nEvery policy capped at the same tokens per layer and KV head: "
           f"the share of the {video_tokens} video tokens plus the prompt's text tokens (progressive: all of "
           "them, evicting every update_every tokens, question and answer included; one-shot: those before "
           "the video's end, one eviction there). The NAMM keeps the top-k of its scores; UniformFrames "
           "feeds that share of the frames to a full cache. Sorted by accuracy.\n\n" + capped_tables
           if capped_tables else "")
        + "\n\nAccuracy per task type:\n\n" + task_table + "\n",
        SUMMARY_NAME,
    )
    print(main_table)
    if capped_tables:
        print(capped_tables)
    return summary
