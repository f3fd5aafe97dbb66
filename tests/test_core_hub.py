"""Hub-id loading, tested offline against a local directory in the Hub cache layout."""

from __future__ import annotations

import torch

from namm_transfer import NAMM, NAMMConfig


def test_from_pretrained_resolves_a_hub_id_from_the_local_hub_cache(tmp_path):
    namm = NAMM.init_random(seed=7, config=NAMMConfig(update_every=128))
    snapshot = tmp_path / "models--someone--namm-test" / "snapshots" / "0123abcd"
    namm.save_pretrained(snapshot)
    (tmp_path / "models--someone--namm-test" / "refs").mkdir()
    (tmp_path / "models--someone--namm-test" / "refs" / "main").write_text("0123abcd")
    loaded = NAMM.from_pretrained("someone/namm-test", cache_dir=tmp_path)  # HF_HUB_OFFLINE=1 (conftest)
    assert torch.equal(loaded.params, namm.params)
    assert loaded.config == namm.config
