"""The comparison harness: rows that resume, the settings guard, means, the matched budget."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from namm_transfer.adapters import MemoryReport
from namm_transfer.pipelines.harness import (
    RowStore,
    check_setting,
    matched_budget,
    mean_se,
    namm_budget,
    write_summary,
)


def _store(path):
    return RowStore(path, key=lambda r: (r["policy"], r["id"]))


def test_rows_resume_latest_wins_and_failed_rows_are_redone(tmp_path):
    store = _store(tmp_path / "rows.jsonl")
    store.add({"policy": "A", "id": 1, "failed": True})
    store.add({"policy": "A", "id": 2, "score": 0.5})
    assert not store.done(("A", 1)) and store.done(("A", 2)) and not store.done(("B", 2))
    store.add({"policy": "A", "id": 1, "score": 1.0})  # the retry of the failed row
    again = _store(tmp_path / "rows.jsonl")  # a new run reads what the last one appended
    assert again.done(("A", 1)) and again.latest[("A", 1)]["score"] == 1.0
    assert len(again.rows()) == 2 and len((tmp_path / "rows.jsonl").read_text().splitlines()) == 3
    assert again.forget(lambda r: r["id"] == 2) == 1 and not again.done(("A", 2))


def test_rows_from_other_files_and_old_names(tmp_path):
    old = {"policy": "full", "id": 0, "end_kept_per_layer": [3.0], "end_since_update_per_layer": [1.0]}
    (tmp_path / "rows.shard1of2.jsonl").write_text(json.dumps(old) + "\n")
    store = RowStore(tmp_path / "rows.shard0of2.jsonl", key=lambda r: (r["policy"], r["id"]),
                     read=sorted(tmp_path.glob("rows*.jsonl")))
    row = store.latest[("FullCache", 0)]
    assert row["kept_per_layer"] == [3.0] and row["since_update"] == [1.0]


def test_refresh_sees_rows_other_shards_appended_since_even_from_a_file_that_did_not_exist(tmp_path):
    key = lambda r: (r["policy"], r["id"])  # noqa: E731
    mine = RowStore(tmp_path / "rows.shard0of2.jsonl", key=key, shards="rows*.jsonl")
    other = RowStore(tmp_path / "rows.shard1of2.jsonl", key=key, shards="rows*.jsonl")
    mine.add({"policy": "A", "id": 0})
    other.add({"policy": "A", "id": 1})
    assert not mine.done(("A", 1))
    mine.refresh()
    assert mine.done(("A", 1)) and mine.done(("A", 0)) and len(mine.rows()) == 2


def test_own_rows_win_over_another_files_row_of_the_same_key(tmp_path):
    """Rows of an older run copied beside a new one (to reuse what does not change) must not shadow
    what the new run wrote for the same key, whichever file name sorts last."""
    key = lambda r: (r["policy"], r["id"])  # noqa: E731
    old = {"policy": "NAMM", "id": 0, "namm": "old"}
    (tmp_path / "rows.shard1of2.jsonl").write_text(json.dumps(old) + "\n")
    store = RowStore(tmp_path / "rows.jsonl", key=key, shards="rows*.jsonl")
    assert store.latest[("NAMM", 0)]["namm"] == "old"
    store.forget(lambda r: r["namm"] == "old")
    store.add({"policy": "NAMM", "id": 0, "namm": "new"})
    store.refresh()
    assert store.latest[("NAMM", 0)]["namm"] == "new"
    reopened = RowStore(tmp_path / "rows.jsonl", key=key, shards="rows*.jsonl")
    assert reopened.latest[("NAMM", 0)]["namm"] == "new"


def test_invalid_rows_never_shadow_valid_ones_whichever_file_is_read_last(tmp_path):
    """A shard process whose own file still holds an older NAMM's row must see the new row another
    file holds for that key (and count the old one as ignored)."""
    key = lambda r: (r["policy"], r["id"])  # noqa: E731
    for name, namm in (("rows.jsonl", "new"), ("rows.shard0of2.jsonl", "old")):
        (tmp_path / name).write_text(json.dumps({"policy": "NAMM", "id": 0, "namm": namm}) + "\n")
    shard = RowStore(tmp_path / "rows.shard0of2.jsonl", key=key, shards="rows*.jsonl",
                     valid=lambda r: r["namm"] == "new")
    assert shard.done(("NAMM", 0)) and shard.latest[("NAMM", 0)]["namm"] == "new" and shard.ignored == 1


def test_settings_guard_names_what_differs(tmp_path):
    check_setting(tmp_path, {"a": 1, "b": "x"})
    check_setting(tmp_path, {"a": 1, "b": "x"})  # same setting: resumes
    with pytest.raises(ValueError, match=r"another setting \(a: 1 there, 2 now, c: None there, 3 now\)"):
        check_setting(tmp_path, {"a": 2, "b": "x", "c": 3})
    # a key older files lack takes its assumed value; an ignored key of an older file is dropped
    (tmp_path / "setting.json").write_text(json.dumps({"a": 1, "old": True}))
    check_setting(tmp_path, {"a": 1, "new": None}, assumed={"new": None}, ignored=("old",))


def test_mean_and_standard_error():
    mean, se = mean_se([1.0, 2.0, 3.0, 6.0])
    assert mean == 3.0 and se == pytest.approx(np.std([1, 2, 3, 6], ddof=1) / 2)
    assert mean_se([5.0]) == (5.0, 0.0) and all(np.isnan(mean_se([])))


def test_matched_budget_from_memory_reports():
    valid = [torch.tensor([[[1, 1, 1, 0], [1, 1, 0, 0]], [[1, 1, 1, 1], [1, 1, 1, 1]]], dtype=torch.bool)]
    report = MemoryReport(valid, [torch.zeros(2, 2, 4, dtype=torch.long)], [torch.tensor([1, 0])], [8])
    rows = [report.sample(0), report.sample(1)]
    assert rows == [{"kept_per_layer": [2.5], "since_update": [1.0]},
                    {"kept_per_layer": [4.0], "since_update": [0.0]}]
    assert matched_budget(rows) == [3]  # mean of (2.5 - 1) and 4, rounded
    assert matched_budget([{"kept_per_layer": [0.2, 7.0]}]) == [1, 7]  # at least 1; no cadence: nothing fresh
    with pytest.raises(ValueError, match="no successful sample"):
        matched_budget([{"failed": True}])


def test_write_summary(tmp_path):
    path = write_summary(tmp_path, {"x": 1}, "# title")
    assert path.read_text() == "# title\n" and json.loads((tmp_path / "summary.json").read_text()) == {"x": 1}


def test_namm_budget_needs_every_item_and_measures_the_rest(tmp_path):
    store = RowStore(tmp_path / "rows.jsonl", key=lambda r: (r["policy"], r["id"]))
    store.add({"policy": "NAMM", "id": 0, "kept_per_layer": [10.0, 4.0], "since_update": [2.0, 2.0]})
    is_namm = lambda r: r["policy"] == "NAMM"  # noqa: E731
    with pytest.raises(ValueError, match=r"H2O needs the NAMM.s budget, measured on all 2 items"):
        namm_budget(store, is_namm, 2, needed_by="H2O")
    store.add({"policy": "NAMM", "id": 1, "kept_per_layer": [14.0, 2.0], "since_update": [2.0, 0.0]})
    assert namm_budget(store, is_namm, 2, needed_by="H2O") == [10, 2]


def test_memory_report_retention_is_the_share_of_heads_holding_each_position():
    # one layer, one sample, two KV heads: head 0 holds positions 0, 3, 1; head 1 holds 3 (slot 2 empty)
    valid = [torch.tensor([[[1, 1, 1], [0, 1, 0]]], dtype=torch.bool)]
    positions = [torch.tensor([[[0, 3, 1], [5, 3, 4]]])]
    report = MemoryReport(valid, positions, [torch.tensor([0])], [8])
    torch.testing.assert_close(report.retention(0, 5), torch.tensor([[0.5, 0.5, 0.0, 1.0, 0.0]]))
