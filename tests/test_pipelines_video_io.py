"""Video IO without torchvision: frame sampling, per-family preprocessing, prompts, read errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny_llava import FAMILIES, build

from namm_transfer.adapters import attach, frame_map, video_layout
from namm_transfer.pipelines.video.io import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    VideoPreprocessor,
    VideoReadError,
    build_prompt,
    encode_video_prompt,
    fps_indices,
    read_frames,
    uniform_indices,
    write_video,
)
from namm_transfer.policies import Recency

av = pytest.importorskip("av")
BACKENDS = [b for b in ("decord", "av") if __import__("importlib").util.find_spec(b) is not None]
N, SIDE, FPS = 16, 64, 8.0


def colour_frames(n: int = N, height: int = SIDE, width: int = SIDE) -> np.ndarray:
    """Frame i is one flat colour: R = 16 i, G = 255 - 16 i, B = 128."""
    frames = np.zeros((n, height, width, 3), dtype=np.uint8)
    frames[..., 0] = (np.arange(n) * 16)[:, None, None]
    frames[..., 1] = (255 - np.arange(n) * 16)[:, None, None]
    frames[..., 2] = 128
    return frames


def frame_ids(frames: np.ndarray) -> list[int]:
    """Which source frame each decoded frame is (from its red level; H.264 is off by a few levels)."""
    return [int(round(float(f[..., 0].mean()) / 16)) for f in frames]


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("videos") / "colours.mp4", colour_frames(), fps=FPS)


# --- sampling --------------------------------------------------------------------------------------


def test_index_rules():
    assert uniform_indices(16, 4).tolist() == [0, 5, 10, 15]
    assert uniform_indices(16, 1).tolist() == [0]
    assert uniform_indices(3, 5).tolist() == [0, 0, 1, 1, 2]  # more asked than there are: repeats
    assert fps_indices(16, 8.0, 2.0).tolist() == [0, 4, 8, 12]
    assert fps_indices(16, 8.0, 3.0).tolist() == [0, 2, 5, 8, 10, 13]  # floor(k * 8 / 3)
    assert fps_indices(16, 8.0, 2.0, num_frames=3).tolist() == [0, 4, 12]
    assert fps_indices(16, 8.0, 30.0).tolist() == list(range(16))  # above the native rate: each once
    assert fps_indices(16, 8.0, 0.1).tolist() == [0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_frames_selection(video, backend):
    everything = read_frames(video, backend=backend)
    assert everything.shape == (N, SIDE, SIDE, 3) and everything.dtype == np.uint8
    assert frame_ids(everything) == list(range(N))
    assert np.abs(everything.astype(int) - colour_frames().astype(int)).max() <= 4
    four = read_frames(video, num_frames=4, backend=backend)
    assert frame_ids(four) == [0, 5, 10, 15]
    assert np.array_equal(four, everything[[0, 5, 10, 15]])
    assert frame_ids(read_frames(video, fps=2, backend=backend)) == [0, 4, 8, 12]
    assert frame_ids(read_frames(video, fps=2, num_frames=3, backend=backend)) == [0, 4, 12]


def test_backends_decode_identically(video):
    if len(BACKENDS) < 2:
        pytest.skip("needs both decord and PyAV")
    assert np.array_equal(read_frames(video, backend="decord"), read_frames(video, backend="av"))


def test_bad_arguments_are_not_read_errors(video):
    with pytest.raises(ValueError):
        read_frames(video, num_frames=0)
    with pytest.raises(ValueError):
        read_frames(video, fps=-1)


# --- unreadable videos ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broken(tmp_path_factory, video):
    folder = tmp_path_factory.mktemp("broken")
    data = video.read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])  # index at the front, frames cut
    (folder / "tail_cut.mp4").write_bytes(data[: int(len(data) * 0.9)])
    (folder / "garbage.mp4").write_bytes(b"this is not a video\n" * 50)
    (folder / "empty.mp4").write_bytes(b"")
    return folder


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "name,cause",
    [
        ("missing.mp4", "no such file"),
        ("empty.mp4", "empty file"),
        ("garbage.mp4", ""),
        ("truncated.mp4", ""),
        ("tail_cut.mp4", ""),
    ],
)
def test_unreadable_videos_raise_read_error(broken, backend, name, cause):
    path = broken / name
    with pytest.raises(VideoReadError) as caught:
        read_frames(path, num_frames=4, backend=backend)
    assert caught.value.path == str(path) and str(path) in str(caught.value)
    assert cause in caught.value.cause and caught.value.cause


def test_a_loop_records_failures_and_continues(video, broken):
    """What an evaluation does: one bad sample is recorded, the others are read."""
    results = []
    for path in (video, broken / "truncated.mp4", broken / "missing.mp4", video):
        try:
            results.append(read_frames(path, num_frames=2).shape[0])
        except VideoReadError as error:
            results.append(error.cause)
    assert results[0] == results[3] == 2
    assert isinstance(results[1], str) and results[2] == "no such file"


# --- preprocessing -------------------------------------------------------------------------------


def _normalise(frames_uint8: np.ndarray, mean, std) -> np.ndarray:
    x = frames_uint8.astype(np.float64) / 255.0
    x = (x - np.asarray(mean)) / np.asarray(std)
    return x.transpose(0, 3, 1, 2)


def test_family_defaults_and_shapes():
    frames = colour_frames(n=3, height=48, width=64)
    lnv, ov, vl = (
        VideoPreprocessor.for_family(f) for f in ("llava_next_video", "llava_onevision", "video_llava")
    )
    assert lnv.size == {"shortest_edge": 224} and lnv.crop_size == {"height": 224, "width": 224}
    assert lnv._resize_size(48, 64) == (224, 298)  # long edge int(224 * 64 / 48)
    assert lnv(frames).shape == vl(frames).shape == (3, 3, 224, 224)
    assert ov.size == {"height": 384, "width": 384} and not ov.do_center_crop
    out = ov(frames)
    assert out.shape == (3, 3, 384, 384) and out.dtype == torch.float32
    for p in (lnv, ov, vl):
        assert p.image_mean == OPENAI_CLIP_MEAN and p.image_std == OPENAI_CLIP_STD and p.resample == 3
    with pytest.raises(ValueError):
        VideoPreprocessor.for_family("llava")


def test_values_match_hand_computation():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    for family in FAMILIES:
        pre = VideoPreprocessor.for_model(build(family))  # 32 px towers: no resize, full-frame crop
        assert pre.output_size(32, 32) == (32, 32)
        np.testing.assert_allclose(
            pre(frames).numpy(), _normalise(frames, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), atol=1e-5
        )
    # a flat frame stays flat through the bicubic resize and the crop
    flat = colour_frames(n=2, height=48, width=64)
    out = VideoPreprocessor.for_family("llava_next_video")(flat).numpy()
    expected = _normalise(flat[:, :1, :1], OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), atol=1e-5)
    # checkpoint settings (OneVision's SigLIP mean/std 0.5) override the defaults
    half = VideoPreprocessor.from_dict(
        "llava_onevision",
        {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "size": {"height": 32, "width": 32}},
    )
    np.testing.assert_allclose(half(frames).numpy(), _normalise(frames, [0.5] * 3, [0.5] * 3), atol=1e-5)


def test_centre_crop_offsets():
    """torchvision's offsets: round((H - h) / 2), Python rounding."""
    frame = np.arange(4 * 9 * 3, dtype=np.uint8).reshape(1, 4, 9, 3)
    pre = VideoPreprocessor(
        do_resize=False, crop_size={"height": 4, "width": 4}, do_rescale=False, do_normalize=False
    )
    out = pre(frame).numpy().transpose(0, 2, 3, 1)
    assert np.array_equal(out, frame[:, :, 2:6])  # round(2.5) == 2
    pre = VideoPreprocessor(
        do_resize=False, crop_size={"height": 2, "width": 6}, do_rescale=False, do_normalize=False
    )
    assert np.array_equal(pre(frame).numpy().transpose(0, 2, 3, 1), frame[:, 1:3, 2:8])  # round(1.5) == 2


# --- prompts -------------------------------------------------------------------------------------


class CharTokenizer:
    """A tokenizer without a <video> token: one id per character, BOS = 1."""

    unk_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [2 + (ord(c) % 90) for c in text]}

    def convert_tokens_to_ids(self, token):
        return self.unk_token_id


class VideoAwareTokenizer(CharTokenizer):
    """Knows "<video>" as one added token (id 100), as the llava-hf tokenizers do."""

    def __call__(self, text, add_special_tokens=True):
        ids = [1] if add_special_tokens else []
        for i, piece in enumerate(text.split("<video>")):
            ids += [100] if i else []
            ids += [2 + (ord(c) % 90) for c in piece]
        return {"input_ids": ids}

    def convert_tokens_to_ids(self, token):
        return 100 if token == "<video>" else self.unk_token_id


def test_prompt_formats():
    q = "What colour is the ball?"
    assert build_prompt("llava_next_video", q) == f"USER: <video>\n{q} ASSISTANT:"
    assert build_prompt("video_llava", q, answer_prefix="Answer:") == f"USER: <video>\n{q} ASSISTANT: Answer:"
    assert build_prompt("llava_onevision", q, system="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        f"<|im_start|>user\n<video>\n{q}<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("tokenizer", [CharTokenizer(), VideoAwareTokenizer()])
def test_encode_expands_the_video_tokens(tokenizer):
    model = build("llava_onevision")
    layout = video_layout(model)
    prompt = build_prompt("llava_onevision", "Why?")
    ids = encode_video_prompt(tokenizer, prompt, layout, num_frames=5)
    assert ids.count(layout.video_token_id) == 5 * 4 + 1
    before, after = prompt.split("<video>")
    assert ids[0] == 1 and len(ids) == 1 + len(before) + 21 + len(after)
    with pytest.raises(ValueError, match="placeholders"):
        encode_video_prompt(tokenizer, prompt + "<video>", layout, num_frames=[2])


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_end_to_end_read_preprocess_generate(video, family):
    """A decoded, preprocessed video and an expanded prompt run through generate() with a policy."""
    model = build(family)
    layout = video_layout(model)
    frames = read_frames(video, num_frames=4)
    pixels = VideoPreprocessor.for_model(model)(frames)[None]
    ids = torch.tensor([encode_video_prompt(CharTokenizer(), build_prompt(family, "Which?"), layout, 4)])
    ids = ids.clamp(max=model.config.text_config.vocab_size - 1)
    with attach(model, Recency(budget=24, sink=2, update_every=16)) as handle:
        out = model.generate(input_ids=ids, pixel_values_videos=pixels, max_new_tokens=3, do_sample=False)
        retention = handle.frame_retention(frame_map(ids, layout))
    assert out.shape[1] == ids.shape[1] + 3
    assert retention.shape == (2, 4) and retention[:, -1].mean() >= retention[:, 0].mean()
