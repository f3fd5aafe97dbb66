"""The README's Python snippets run as written (they are the user journeys)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), namespace)
    if index == 0:
        assert namespace["stats"]["stored_kv_bytes"] < namespace["stats"]["full_kv_bytes"]
    if index == 2:
        assert (tmp_path / "my-namm" / "model.safetensors").is_file()
    if "retention" in namespace:  # the video journey: 32 frames of the LM's 30 layers, capped at 64 tokens
        assert namespace["retention"].shape == (30, 32)
        assert (namespace["retention"].sum(axis=1) * 4).max() <= 64
        assert namespace["answer"] == namespace["record"].answer
        assert (tmp_path / "retention.png").is_file()


def test_readme_has_the_two_setup_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
