"""attach() on tiny random LLaVA video models (LLaVA-NeXT-Video, LLaVA-OneVision, Video-LLaVA), and the
frame map / per-frame retention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny_llava import FAMILIES, FRAMES, VIDEO_ID, build

from namm_transfer import NAMM, NAMMConfig
from namm_transfer.adapters import (
    attach,
    frame_map,
    frame_retention,
    retention_image,
    save_retention_heatmap,
    video_layout,
)
from namm_transfer.policies import FullCache, Recency

# P = 4: (4 // 2)**2 = 4; ceil(4 / 2)**2 = 4 plus one newline after the video; 4**2 + 1 = 17
EXPECTED_LAYOUT = {"llava_next_video": (4, 0), "llava_onevision": (4, 1), "video_llava": (17, 0)}


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return build(request.param)


def _inputs(model, frames: int = FRAMES, seed: int = 0, text_before: int = 6, text_after: int = 5):
    layout = video_layout(model)
    g = torch.Generator().manual_seed(seed)
    before = torch.randint(0, 90, (1, text_before), generator=g)
    after = torch.randint(0, 90, (1, text_after), generator=g)
    video = torch.full((1, layout.video_tokens(frames)), VIDEO_ID)
    ids = torch.cat([before, video, after], dim=1)
    pixels = torch.randn(1, frames, 3, 32, 32, generator=g)
    return ids, pixels


def test_layout_matches_the_model(model):
    """The token count from video_layout() is the one the model's placeholder check accepts."""
    layout = video_layout(model)
    assert (layout.tokens_per_frame, layout.tokens_after_video) == EXPECTED_LAYOUT[model.config.model_type]
    assert layout.video_token_id == VIDEO_ID
    ids, pixels = _inputs(model)
    with torch.no_grad():
        model(input_ids=ids, pixel_values_videos=pixels)  # accepted
        bad = torch.cat([ids[:, :1], torch.full((1, 1), VIDEO_ID), ids[:, 1:]], dim=1)
        with pytest.raises(ValueError):
            model(input_ids=bad, pixel_values_videos=pixels)


@torch.no_grad()
@pytest.mark.parametrize("chunk", [None, 8])
def test_keep_all_namm_generate_equals_bare(model, chunk):
    """Greedy tokens are equal; with prefill_chunk the prompt (video placeholders included) is fed in
    chunks, transformers slicing the pre-encoded video features to each chunk's placeholders."""
    ids, pixels = _inputs(model)
    bare = model.generate(input_ids=ids, pixel_values_videos=pixels, max_new_tokens=8, do_sample=False)
    with attach(model, NAMM(NAMMConfig(update_every=8)), prefill_chunk=chunk) as handle:
        assert model.config.text_config._attn_implementation == "namm_attention"
        assert model.config.vision_config._attn_implementation == "sdpa"  # vision tower untouched
        tokens = model.generate(input_ids=ids, pixel_values_videos=pixels, max_new_tokens=8, do_sample=False)
        stats = handle.stats()
    assert stats["updates"] > 0 and stats["evictions"] == 0
    assert torch.equal(tokens, bare)
    assert model.config.text_config._attn_implementation == "sdpa"  # detach restored it


@torch.no_grad()
def test_recency_budget_bounds_the_cache(model):
    ids, pixels = _inputs(model, frames=4)
    budget = 16
    with attach(model, Recency(budget=budget, sink=2, update_every=8)) as handle:
        tokens = model.generate(input_ids=ids, pixel_values_videos=pixels, max_new_tokens=6, do_sample=False)
        stats = handle.stats()
        for layer in handle.cache.layers:  # physically bounded: stored slots, not just masked ones
            assert layer.keys.shape[2] <= budget + 8
            assert int(layer.memory.valid.sum(-1).max()) <= budget + 8
    assert tokens.shape[1] == ids.shape[1] + 6
    assert stats["tokens_seen"] == ids.shape[1] + 5  # the last generated token is never fed
    assert stats["evictions"] > 0
    assert stats["stored_kv_bytes"] < stats["full_kv_bytes"]


def _vision_output(model, pixels):
    tower = model.model.video_tower if hasattr(model.model, "video_tower") else model.model.vision_tower
    flat = pixels.flatten(0, 1)
    return tower(flat, output_hidden_states=True).hidden_states


@torch.no_grad()
def test_vision_tower_is_untouched(model):
    """The vision tower's output is identical with and without a policy attached, also while the
    policy's attention function is in use (inside generate), and the function never sees its layers."""
    ids, pixels = _inputs(model)
    bare = _vision_output(model, pixels)
    bare_video = model.model.get_video_features(pixel_values_videos=pixels).pooler_output
    seen = []
    from namm_transfer.adapters import attention

    original = attention.namm_attention_forward

    def spy(module, *args, **kwargs):
        seen.append(type(module).__name__)
        return original(module, *args, **kwargs)

    attention.namm_attention_forward = spy
    try:
        with attach(model, NAMM(NAMMConfig(update_every=8))):
            from transformers import AttentionInterface

            AttentionInterface.register(attention.ATTENTION_NAME, spy)
            attached = _vision_output(model, pixels)
            attached_video = model.model.get_video_features(pixel_values_videos=pixels).pooler_output
            model.generate(input_ids=ids, pixel_values_videos=pixels, max_new_tokens=2, do_sample=False)
    finally:
        attention.namm_attention_forward = original
        attention.register()
    for a, b in zip(bare, attached, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(bare_video, attached_video, strict=True):
        assert torch.equal(a, b)
    assert seen and all(name in {"LlamaAttention", "Qwen2Attention"} for name in seen)


def test_unmanaged_modules_fall_back_to_sdpa(model):
    """Even when a plain string puts every sub-model on the registered function, modules with no
    policy (the vision tower) get ordinary bidirectional SDPA, identical to the default."""
    _, pixels = _inputs(model)
    with torch.no_grad():
        bare = _vision_output(model, pixels)
        from namm_transfer.adapters.attention import register

        model.set_attn_implementation(register())
        try:
            switched = _vision_output(model, pixels)
        finally:
            model.set_attn_implementation("sdpa")
    for a, b in zip(bare, switched, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# --- frame map and retention ---------------------------------------------------------------------


def test_frame_map_layout(model):
    layout = video_layout(model)
    ids, _ = _inputs(model, frames=3, text_before=6)
    fmap = frame_map(ids, layout)
    per = layout.tokens_per_frame
    expected = (
        [-1] * 6 + [f for f in range(3) for _ in range(per)] + [-1] * layout.tokens_after_video + [-1] * 5
    )
    assert fmap.tolist() == [expected]
    # left padding shifts the map with the tokens; two videos number their frames consecutively
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    assert frame_map(padded, layout)[0, 3:].tolist() == expected
    two = torch.cat([ids, ids], dim=1)
    second = frame_map(two, layout)[0, ids.shape[1] :]
    assert second.max().item() == 5 and second[second >= 0].min().item() == 3
    with pytest.raises(ValueError, match="not a whole"):
        frame_map(torch.cat([ids[:, :7], ids[:, 8:]], dim=1), layout)


@torch.no_grad()
def test_retention_full_cache_is_all_ones(model):
    ids, pixels = _inputs(model, frames=4)
    with attach(model, FullCache()) as handle:
        model.generate(input_ids=ids, pixel_values_videos=pixels, max_new_tokens=3, do_sample=False)
        retention = handle.frame_retention(frame_map(ids, video_layout(model)))
    assert retention.shape == (2, 4)
    assert np.array_equal(retention, np.ones((2, 4)))


@torch.no_grad()
def test_retention_under_recency(model):
    """After a Recency eviction, early frames keep less than late ones; the numbers equal a direct
    count of each frame's surviving arrival positions."""
    layout = video_layout(model)
    ids, pixels = _inputs(model, frames=4, text_before=2, text_after=3)
    budget = layout.tokens_per_frame * 2 + 4
    with attach(model, Recency(budget=budget, sink=2, update_every=ids.shape[1])) as handle:
        model(input_ids=ids, pixel_values_videos=pixels)  # one eviction at the end of the prompt
        fmap = frame_map(ids, layout)
        retention = frame_retention(handle, fmap)
        memories = [layer.memory for layer in handle.cache.layers]
    assert retention.shape == (2, 4)
    assert (retention[:, 0] < retention[:, -1]).all()
    assert (retention[:, -1] == 1.0).all() and (retention[:, 0] == 0.0).all()
    for i, memory in enumerate(memories):
        for f in range(4):
            frame_pos = set(torch.nonzero(fmap[0] == f).flatten().tolist())
            shares = []
            for h in range(memory.positions.shape[1]):
                kept = memory.positions[0, h][memory.valid[0, h]].tolist()
                shares.append(len(frame_pos & set(kept)) / len(frame_pos))
            assert retention[i, f] == pytest.approx(np.mean(shares))


def test_retention_is_per_head_and_per_sample():
    """A hand-made table: heads keep different slots; samples without a frame are not counted."""
    from namm_transfer.memory import LayerMemory

    memory = LayerMemory(FullCache(), 0)
    memory.append(2, 2, 6, torch.device("cpu"))
    # sample 0, head 0 keeps positions 0..5; head 1 drops position 1 and 4 (slot order may be any)
    memory.valid[0, 1, 1] = False
    memory.valid[0, 1, 4] = False
    memory.valid[1, :, :] = True
    fmap = torch.tensor([[0, 0, 1, 1, 2, -1], [-1, 0, 0, 1, 1, -1]])
    retention = frame_retention([memory], fmap)
    # frame 0: s0 -> (1 + 0.5) / 2 = 0.75; s1 -> 1 => 0.875. frame 1: 1. frame 2: s0 only -> 0.5
    np.testing.assert_allclose(retention, [[0.875, 1.0, 0.5]])
    assert np.isnan(frame_retention([memory], fmap, num_frames=4)[0, 3])  # no sample has frame 3


def test_heatmap_png_and_tensorboard(tmp_path):
    retention = np.array([[0.0, 0.5, 1.0], [0.25, 0.75, 1.0]])
    path = save_retention_heatmap(retention, tmp_path / "maps" / "heat.png", title="Recency")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = retention_image(retention, title="x")
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


@torch.no_grad()
@pytest.mark.parametrize("text_type", ["gemma3_text", "qwen3"])
def test_llava_next_video_around_another_language_model(text_type):
    """The wrapper's descriptor finds the language model whatever its family: here Gemma3 (sliding
    layers narrower than the prompt, one KV head) and Qwen3 (q/k norm). A keep-all NAMM generates the
    bare tokens; Recency keeps every layer at its budget, and Gemma3's sliding layers within their window."""
    model = build("llava_next_video", text_type=text_type)
    ids, pixels = _inputs(model, frames=4)
    bare = model.generate(input_ids=ids, pixel_values_videos=pixels, max_new_tokens=6, do_sample=False)
    with attach(model, NAMM(NAMMConfig(update_every=8)), prefill_chunk=8) as handle:
        assert handle.model_type == text_type and handle.plan.wrapper.model_type == "llava_next_video"
        tokens = model.generate(input_ids=ids, pixel_values_videos=pixels, max_new_tokens=6, do_sample=False)
        stats = handle.stats()
    assert torch.equal(tokens, bare)
    assert stats["evictions"] == 0 and stats["updates"] > 0
    windows = [12, None, 12] if text_type == "gemma3_text" else [None, None, None]
    with attach(model, Recency(budget=10, sink=2, update_every=8)) as handle:
        assert handle.sliding_windows == windows
        model.generate(input_ids=ids, pixel_values_videos=pixels, max_new_tokens=6, do_sample=False)
        for layer, window in zip(handle.cache.layers, windows, strict=True):
            held = int(layer.memory.valid.sum(-1).max())
            assert held <= 10 + 8 - 1 and (window is None or held <= window - 1)
            assert layer.keys.shape[2] == held
        assert handle.stats()["stored_kv_bytes"] < handle.stats()["full_kv_bytes"]
