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


def test_the_families_block_is_generated_from_the_descriptors():
    """The README lists the supported and refused families as the descriptors say; regenerate it with
    ``namm-transfer families --write-readme README.md``."""
    from namm_transfer.adapters.families import DECODERS, REFUSED, readme_block, with_readme_block

    text = README.read_text()
    assert with_readme_block(text) == text, "stale: run `namm-transfer families --write-readme README.md`"
    block = readme_block()
    assert all(f"(`{f.model_type}`)" in block for f in DECODERS) and all(r.reason in block for r in REFUSED)


def test_write_readme_rewrites_only_the_block(tmp_path, capsys):
    from namm_transfer.adapters.families import readme_block
    from namm_transfer.pipelines.cli import main

    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- families:start -->\nold list\n<!-- families:end -->\n\nafter\n")
    assert main(["families", "--write-readme", str(readme)]) == 0
    assert readme.read_text() == f"# x\n\n{readme_block()}\n\nafter\n"
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="no <!-- families:start -->"):
        main(["families", "--write-readme", str(readme)])
