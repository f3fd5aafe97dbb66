"""Interleaved A/B of the NAMM's two heavy steps against an earlier revision, in one process.

The streaming features (4 progressive updates of 512 rows at 512..2048 keys, 3 KV heads: one layer
of SmolLM2-135M's keep-everything 2,048-token prefill) and the BAM scores of the same cache sizes, timed
alternately with the revision's ``namm_transfer/features.py`` and ``scorers.py`` (read with ``git show``)
and the working tree's, so machine load hits both alike. Prints medians and the new / old ratios, and
checks the two give the same results.

    python benchmarks/scripts/ab_bookkeeping.py --rev cc1f23f --reps 9
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from namm_transfer import features as new_features
from namm_transfer import scorers as new_scorers


def _module_at(rev: str, path: str, name: str, folder: Path):
    show = ["git", "show", f"{rev}:{path}"]
    source = subprocess.run(show, check=True, capture_output=True, text=True).stdout
    file = folder / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", default="cc1f23f", help="the earlier revision (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=9, help="alternating repetitions (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        old_features = _module_at(args.rev, "namm_transfer/features.py", "old_features", Path(tmp))
        old_scorers = _module_at(args.rev, "namm_transfer/scorers.py", "old_scorers", Path(tmp))
    sizes = (512, 1024, 1536, 2048)
    rows = []
    for keys in sizes:  # causal rows of a 512-query chunk whose queries are the last 512 keys
        chunk = torch.rand(1, 3, 512, keys).tril(keys - 512)
        rows.append(chunk / chunk.sum(-1, keepdim=True))
    shapes = new_scorers.ScorerShapes()
    params = torch.randn(1, shapes.n_params) * 0.1
    cache = [(torch.randn(1, 3, s, 25), torch.ones(1, 3, s, dtype=torch.bool),
              torch.arange(s).expand(1, 3, s)) for s in sizes]

    def spectrum(module):
        state = module.StreamingSpectrogram()
        for chunk in rows:
            state.observe(chunk, causal=True)
        return state.spectrum

    def scores(module):
        return [module.score_tokens(params, f, v, p, shapes) for f, v, p in cache]

    same_features = torch.allclose(spectrum(old_features), spectrum(new_features), rtol=1e-5, atol=1e-8)
    same_scores = all(torch.allclose(a, b, rtol=1e-5, atol=1e-5)
                      for a, b in zip(scores(old_scorers), scores(new_scorers), strict=True))
    steps = {"features, old": lambda: spectrum(old_features),
             "features, new": lambda: spectrum(new_features),
             "scores, old": lambda: scores(old_scorers),
             "scores, new": lambda: scores(new_scorers)}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.reps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    print(f"revision {args.rev} (old) vs the working tree (new); torch {torch.__version__}, 1 thread, "
          f"{args.reps} alternating repetitions; python {sys.version.split()[0]}")
    print(f"same features: {same_features}; same scores: {same_scores}")
    for name, ms in median.items():
        print(f"{name:14s} {ms:7.1f} ms (median)")
    print(f"features new / old: {median['features, new'] / median['features, old']:.3f}; "
          f"scores new / old: {median['scores, new'] / median['scores, old']:.3f}")


if __name__ == "__main__":
    main()
