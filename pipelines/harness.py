"""What every comparison job shares: result rows that resume, the settings guard, means with standard
errors, the baselines' budget at the NAMM's measured cache size, summaries and TensorBoard.

Text (``eval_text``), video (``eval_video``), rollouts (``eval_rollout``) and the demo supply their
items, how one item runs under one policy, and their table columns; the bookkeeping is here, once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from namm_transfer.pipelines.common import log, write_json

SETTING_NAME = "setting.json"
# Row keys renamed since results were first committed: old rows still resume and summarise.
LEGACY_ROW_KEYS = {"end_kept_per_layer": "kept_per_layer", "end_since_update_per_layer": "since_update"}
LEGACY_POLICY_NAMES = {"full": "FullCache"}


def upgrade_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row written under older key or policy names, in today's names (a no-op for new rows)."""
    for old, new in LEGACY_ROW_KEYS.items():
        if old in row and new not in row:
            row[new] = row.pop(old)
    if row.get("policy") in LEGACY_POLICY_NAMES:
        row["policy"] = LEGACY_POLICY_NAMES[row["policy"]]
    return row


class RowStore:
    """Result rows of one job, one JSON object per line, appended as each row finishes (a kill loses at
    most the row in progress). On resume the latest row of each key wins and failed rows are redone.

    Args:
        path: the file new rows are appended to.
        key: what identifies a row (e.g. policy and sample id).
        read: more files to read on resume; ``path`` is always read.
        shards: a glob pattern in ``path``'s folder (e.g. ``rows*.jsonl``) for the rows files of
            parallel processes, looked up again at every :meth:`refresh`, so a shard that starts later
            is found too.
        valid: rows for which it returns False are ignored when read, as if absent (e.g. rows of
            another NAMM beside ones that do not depend on it), so they never shadow a valid row of the
            same key in another file; ``ignored`` counts them.
    """

    def __init__(self, path: str | Path, key: Callable[[dict[str, Any]], Hashable],
                 read: Iterable[str | Path] = (), shards: str | None = None,
                 valid: Callable[[dict[str, Any]], bool] | None = None):
        self.path = Path(path)
        self.key = key
        self.read, self.shards = [Path(f) for f in read], shards
        self.valid = valid
        self.ignored = 0
        self.latest: dict[Hashable, dict[str, Any]] = {}
        self.refresh()
        if self.latest:
            log(f"resuming: {len(self.latest)} rows already in {self.path.parent} (failed ones are retried)")

    def refresh(self) -> None:
        """Read every file again: rows other processes (shards) appended since are seen, e.g. before a
        summary. The files hold every row this store added, so nothing of its own is lost. Rows that fail
        ``valid`` are skipped; of two valid rows of one key in different files, the one in this store's
        own file wins (it is read last), whatever the files' names."""
        self.latest, self.ignored = {}, 0
        found = sorted(self.path.parent.glob(self.shards)) if self.shards else []
        others = [f for f in dict.fromkeys([*self.read, *found]) if f.resolve() != self.path.resolve()]
        for file in [*others, self.path]:
            if file.is_file():
                for line in file.read_text().splitlines():
                    if line.strip():
                        row = upgrade_row(json.loads(line))
                        if self.valid is not None and not self.valid(row):
                            self.ignored += 1
                            continue
                        self.latest[self.key(row)] = row

    def done(self, key: Hashable) -> bool:
        """A finished (not failed) row exists for ``key``."""
        row = self.latest.get(key)
        return row is not None and not row.get("failed")

    def add(self, row: dict[str, Any]) -> dict[str, Any]:
        self.latest[self.key(row)] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    def forget(self, where: Callable[[dict[str, Any]], bool]) -> int:
        """Drop the rows ``where`` selects (to be redone, e.g. rows of another NAMM); how many."""
        drop = [k for k, r in self.latest.items() if where(r)]
        for k in drop:
            del self.latest[k]
        return len(drop)

    def rows(self, where: Callable[[dict[str, Any]], bool] | None = None) -> list[dict[str, Any]]:
        return [r for r in self.latest.values() if where is None or where(r)]


def check_setting(out_dir: str | Path, setting: Mapping[str, Any], assumed: Mapping[str, Any] | None = None,
                  ignored: Sequence[str] = ()) -> None:
    """Rows are resumed only under the same setting: the first run records ``setting`` in
    ``setting.json``; a rerun with another is refused with an error naming what differs.

    ``assumed`` gives the value of a key that older setting files lack; ``ignored`` keys of older files
    no longer belong to the setting (e.g. rows that depend on the NAMM carry its name instead).
    """
    path = Path(out_dir) / SETTING_NAME
    if not path.is_file():
        write_json(path, dict(setting))
        return
    before = {**(assumed or {}), **json.loads(path.read_text())}
    for key in ignored:
        before.pop(key, None)
    differs = {k: (before.get(k), setting.get(k)) for k in sorted(set(before) | set(setting))
               if before.get(k) != setting.get(k)}
    if differs:
        what = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differs.items())
        raise ValueError(f"{out_dir} holds results of another setting ({what}): use another --output-dir "
                         "(or delete it) rather than mixing the two in one table")


def mean_se(values: Iterable[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n)); NaNs for no values."""
    values = np.asarray(list(values), dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    se = values.std(ddof=1) / np.sqrt(values.size) if values.size > 1 else 0.0
    return float(values.mean()), float(se)


def verdict(summary: Mapping[str, Mapping[str, Any]], namm: str, references: Iterable[str],
            mean_key: str, se_key: str) -> dict[str, Any]:
    """Does ``summary[namm]`` beat every other policy of one table, and by more than their combined
    standard error? ``references`` are left out (the full cache); ``mean_key`` / ``se_key`` name each
    summary's score and its standard error. Empty when the NAMM or anything to beat is missing."""
    if namm not in summary:
        return {}
    skip = {namm, *references}
    mine = summary[namm]
    margins = {}
    for name, s in summary.items():
        if name in skip:
            continue
        combined = float(np.hypot(mine[se_key], s[se_key]))
        margins[name] = {"margin": float(mine[mean_key] - s[mean_key]), "combined_se": combined}
    if not margins:
        return {}
    best = max(margins, key=lambda name: summary[name][mean_key])
    return {
        "above_every_baseline": all(m["margin"] > 0 for m in margins.values()),
        "above_every_baseline_by_combined_se": all(m["margin"] > m["combined_se"] for m in margins.values()),
        "best_baseline": best,
        "margins": margins,
    }


def matched_budget(rows: Sequence[Mapping[str, Any]]) -> list[int]:
    """The baselines' per-layer budget at the NAMM's measured cache size.

    Each row is one sample's memory report under the NAMM: ``kept_per_layer`` (tokens cached per layer,
    mean over KV heads) and, when the policy ran on a cadence, ``since_update`` (tokens added per layer
    since its last update: every policy holds those whatever its budget, so a baseline given the
    NAMM's count less them ends with the NAMM's cache size). Mean over the rows that did not fail,
    rounded, at least 1 per layer.
    """
    ok = [r for r in rows if not r.get("failed")]
    if not ok:
        raise ValueError("the NAMM has no successful sample to measure its budget on: run it first")
    kept = np.array([r["kept_per_layer"] for r in ok], dtype=np.float64)
    fresh = np.array([r.get("since_update") or [0.0] * kept.shape[1] for r in ok], dtype=np.float64)
    return [max(1, int(round(v))) for v in (kept - fresh).mean(axis=0)]


def namm_budget(store: RowStore, is_namm_row: Callable[[dict[str, Any]], bool], items: int,
                needed_by: str) -> list[int]:
    """:func:`matched_budget` over the NAMM's finished rows in ``store`` (``is_namm_row`` selects them);
    an error naming ``needed_by`` when the NAMM has not run on all ``items`` yet."""
    rows = store.rows(is_namm_row)
    if len(rows) < items:
        raise ValueError(f"{needed_by} needs the NAMM's budget, measured on all {items} items "
                         f"({len(rows)} NAMM rows so far): include NAMM in --policies")
    budget = matched_budget(rows)
    log(f"baseline budget per layer (the NAMM's kept tokens less those added since its last update): "
        f"{budget}")
    return budget


def check_fractions(budgets: Sequence[float], what: str = "kept fractions") -> None:
    """Refuse budgets outside (0, 1], naming them (``what``: what the fractions are of)."""
    if any(not 0 < b <= 1 for b in budgets):
        raise ValueError(f"budgets are {what} in (0, 1], got {list(budgets)}")


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)``: a process evaluates every N-th item starting at K."""
    try:
        k, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like K/N (e.g. 0/2), got {text!r}") from None
    if not 0 <= k < n:
        raise ValueError(f"--shard K/N needs 0 <= K < N, got {text!r}")
    return k, n


def shard_rows_name(k: int, n: int, name: str = "rows.jsonl") -> str:
    """The rows file of shard K of N (``name`` itself when there is one shard)."""
    stem, dot, ext = name.partition(".")
    return name if n == 1 else f"{stem}.shard{k}of{n}{dot}{ext}"


def write_summary(out_dir: str | Path, data: Mapping[str, Any], markdown: str, name: str = "summary") -> Path:
    """``out_dir/<name>.json`` (``data``) and ``out_dir/<name>.md`` (``markdown``)."""
    out_dir = Path(out_dir)
    write_json(out_dir / f"{name}.json", data)
    path = out_dir / f"{name}.md"
    path.write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    return path
