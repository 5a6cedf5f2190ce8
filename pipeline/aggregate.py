"""Mean and standard deviation across seeds of DVC experiments.

Run several seeds as DVC experiments, then aggregate them::

    for s in 0 1 2 3 4; do dvc exp run --queue -S seed=$s; done
    dvc queue start -j 2          # wait for `dvc queue status` to show them done
    python -m pipeline.aggregate  # writes reports/seeds.md and reports/seeds.json

Experiments are grouped by every parameter except ``seed``; each group gives, per method
and metric, the mean, the sample standard deviation and the number of seeds. The test
metrics come from each experiment's ``metrics/evaluate.json``: from ``dvc exp show`` for
experiments made when it was DVC's metrics file, else read from the experiment's outputs in
DVC's cache (``dvc.api.read``; it is a plain output since ``metrics/headline.json`` took
its place).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts import HEADLINE, TEST_METRICS
from pipeline.io import atomic_write_json, atomic_write_text
from pipeline.methods import method_label, ordered_methods
from pipeline.report import TABLE_COLUMNS
from pipeline.tables import markdown_table

EVALUATE_METRICS = TEST_METRICS.as_posix()
HEADLINE_METRICS = HEADLINE.as_posix()


@dataclass(frozen=True)
class ExperimentResult:
    name: str
    params: dict[str, Any]
    test: dict[str, Any]  # the content of metrics/evaluate.json
    rev: str = ""  # the experiment's (or commit's) git revision: its outputs in DVC's cache
    baseline: str = ""  # the commit the experiment ran on


def exp_show(all_commits: bool = False) -> list[dict[str, Any]]:
    """What ``dvc exp show --json`` prints for the repository in the working directory
    (HEAD's experiments, or every commit's with ``all_commits``), read in-process through
    DVC's Python API. Shared by the CLIs that read experiments; a dvc failure is a
    SystemExit carrying dvc's message.

    ``Repo.experiments.show`` rather than ``dvc.api.exp_show``: the latter returns
    ``dvc exp show``'s table, one flat row per revision with params and metrics flattened
    to dotted columns, its values re-parsed from text and falsy ones replaced by None
    (``seed: 0`` comes back None), and it has no ``all_commits``. ``experiments.show``
    gives the nested per-file params and metrics and each experiment's base commit, the
    very records ``--json`` serialises, without starting a second Python."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo() as repo:
            return [state.dumpd() for state in repo.experiments.show(all_commits=all_commits)]
    except DvcException as error:
        raise SystemExit(f"error: `dvc exp show` failed: {error}") from error


def _revisions(exp_show: Sequence[Mapping[str, Any]],
               ) -> Iterator[tuple[str, Mapping[str, Any], str, str]]:
    """``(name, data, rev, baseline commit)`` of every commit and experiment shown."""
    for entry in exp_show:
        if entry.get("data"):
            yield entry.get("name") or entry["rev"], entry["data"], entry["rev"], entry["rev"]
        for experiment in entry.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                if rev.get("data"):
                    yield rev.get("name") or rev["rev"], rev["data"], rev["rev"], entry["rev"]


def read_test_metrics(rev: str, repo: str = ".") -> dict[str, Any] | None:
    """``metrics/evaluate.json`` as it is in experiment or commit ``rev`` (the workspace for
    ``"workspace"``), from DVC's cache; None, with a note on stderr, if it cannot be read
    (not in this clone's cache, say)."""
    import dvc.api
    from dvc.exceptions import DvcException

    try:
        text = dvc.api.read(EVALUATE_METRICS, repo=repo,
                            rev=None if rev == "workspace" else rev)
    except (DvcException, OSError, ValueError) as error:
        print(f"note: {EVALUATE_METRICS} of {rev} cannot be read "
              f"({type(error).__name__}: {error}); left out", file=sys.stderr)
        return None
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def parse_exp_show(exp_show: Sequence[Mapping[str, Any]],
                   read: Callable[[str], Mapping[str, Any] | None] = read_test_metrics,
                   ) -> list[ExperimentResult]:
    """Results of every revision in ``dvc exp show --json`` output that has test metrics:
    ``metrics/evaluate.json`` among its DVC metrics (experiments of older commits), or
    ``read(rev)`` of it for a revision whose metrics hold the headline. The workspace is
    skipped when an experiment has the same params (it is that run)."""
    results = []
    for name, data, rev, baseline in _revisions(exp_show):
        shown = data.get("metrics") or {}
        metrics = shown.get(EVALUATE_METRICS, {}).get("data")
        if not metrics and shown.get(HEADLINE_METRICS, {}).get("data"):
            metrics = read(rev)
        params = (data.get("params") or {}).get("params.yaml", {}).get("data")
        if metrics and params:
            results.append(ExperimentResult(name, params, dict(metrics), rev, baseline))
    others = [json.dumps(r.params, sort_keys=True) for r in results if r.name != "workspace"]
    return [r for r in results
            if r.name != "workspace" or json.dumps(r.params, sort_keys=True) not in others]


def _without_seed(params: Mapping[str, Any]) -> str:
    return json.dumps({k: v for k, v in params.items() if k != "seed"}, sort_keys=True)


def aggregate(results: Sequence[ExperimentResult]) -> list[dict[str, Any]]:
    """One group per distinct params-but-seed: seeds, experiment names, test errors and
    test split sizes (per seed), and per method and metric {mean, std, n}. std is the
    sample standard deviation (NaN for one seed); NaN metric values (undefined on a run)
    are left out of that metric."""
    groups: dict[str, list[ExperimentResult]] = {}
    for result in results:
        groups.setdefault(_without_seed(result.params), []).append(result)
    out = []
    for members in groups.values():
        members = sorted(members, key=lambda r: r.params.get("seed", 0))
        methods = sorted({m for r in members for m in r.test["methods"]})
        summary: dict[str, dict[str, dict[str, float]]] = {}
        for method in methods:
            names = sorted({k for r in members for k in r.test["methods"].get(method, {})})
            for name in names:
                values = np.array([r.test["methods"][method][name] for r in members
                                   if name in r.test["methods"].get(method, {})], dtype=float)
                values = values[np.isfinite(values)]
                summary.setdefault(method, {})[name] = {
                    "mean": float(values.mean()) if values.size else math.nan,
                    "std": float(values.std(ddof=1)) if values.size > 1 else math.nan,
                    "n": int(values.size),
                }
        group: dict[str, Any] = {
            "params": {k: v for k, v in members[0].params.items() if k != "seed"},
            "seeds": [r.params.get("seed") for r in members],
            "experiments": [r.name for r in members],
            "test_errors": [r.test.get("errors") for r in members],
            "test_sizes": [r.test.get("size") for r in members],
            "methods": summary,
        }
        # A segmentation's own quality (evaluate.json's "segmentation"); classification
        # groups have no such key.
        miou = [r.test["segmentation"]["miou"] for r in members if "segmentation" in r.test]
        if miou:
            group["miou"] = _stats(np.array(miou, dtype=float))
        out.append(group)
    return out


def _stats(values: np.ndarray) -> dict[str, float]:
    """{mean, std, n} of the finite ``values``: the sample std, NaN for fewer than two."""
    values = values[np.isfinite(values)]
    return {"mean": float(values.mean()) if values.size else math.nan,
            "std": float(values.std(ddof=1)) if values.size > 1 else math.nan,
            "n": int(values.size)}


def _differing_params(groups: Sequence[Mapping[str, Any]]) -> list[str]:
    from pipeline.tracking import flatten

    flat = [flatten(g["params"]) for g in groups]
    keys = sorted({k for f in flat for k in f})
    return [k for k in keys if len({json.dumps(f.get(k)) for f in flat}) > 1]


def cell(stats: Mapping[str, float] | None) -> str:
    if not stats or math.isnan(stats["mean"]):
        return "n/a"
    if math.isnan(stats["std"]):
        return f"{100 * stats['mean']:.2f}"
    return f"{100 * stats['mean']:.2f} ± {100 * stats['std']:.2f}"


def render(groups: Sequence[Mapping[str, Any]]) -> str:
    from pipeline.tracking import flatten

    differing = _differing_params(groups)
    lines = ["# Results across seeds", "",
             "Test metrics (%) as mean ± sample standard deviation over the seeds of each "
             "group of DVC experiments that share every parameter but `seed`.", ""]
    for group in groups:
        flat = flatten(group["params"])
        title = ", ".join(f"`{k}={flat.get(k)}`" for k in differing) or "all experiments"
        lines += [f"## {title}", "",
                  f"Seeds {group['seeds']} (experiments {', '.join(group['experiments'])}); "
                  f"test errors per seed: {group['test_errors']}.", "",
                  markdown_table(
                      ["Method", *(t for _, t, _ in TABLE_COLUMNS)],
                      [[method_label(method),
                        *(cell(group["methods"][method].get(k)) for k, _, _ in TABLE_COLUMNS)]
                       for method in ordered_methods(list(group["methods"]))]),
                  ""]
    return "\n".join(lines)


def experiment_groups(all_commits: bool, hint: str) -> list[dict[str, Any]]:
    """The aggregated groups of this repository's DVC experiments; exits with ``hint``
    when none has test metrics."""
    groups = aggregate(parse_exp_show(exp_show(all_commits=all_commits)))
    if not groups:
        raise SystemExit(f"error: no experiment with {EVALUATE_METRICS} found; {hint}")
    return groups


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Mean and std across seeds of DVC experiments")
    parser.add_argument("--out", type=Path, default=Path("reports/seeds.md"))
    parser.add_argument("--all-commits", action="store_true",
                        help="include experiments of every commit, not only HEAD's")
    args = parser.parse_args(argv)
    groups = experiment_groups(args.all_commits, "run `dvc repro` or `dvc exp run` first")
    atomic_write_text(args.out, render(groups))
    atomic_write_json(args.out.with_suffix(".json"), groups)
    print(f"wrote {args.out} ({len(groups)} group(s), "
          f"{sum(len(g['seeds']) for g in groups)} experiment(s))")


if __name__ == "__main__":
    main()
