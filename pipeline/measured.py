r"""A measured Table 1 row: one setting's full-recipe DVC experiments over several seeds,
aggregated into data that is committed (``reports/measured/<setting>.json`` and ``.md``).

Run the setting over seeds as DVC experiments, then aggregate them::

    dvc exp run --queue -S setting=mnist_mlp -S 'seed=0,1,2'
    dvc queue start -j 1        # wait for `dvc queue status` to show them done
    python -m pipeline.measured mnist_mlp

It reads each experiment's params through ``dvc exp show``, and its test metrics
(``metrics/evaluate.json``), test scores and classifier predictions from the DVC cache
(``dvc.api``), then writes, per method and metric, the mean, sample standard deviation
and per-seed values, and a paired bootstrap of ConfidNet against each baseline pooled over
the seeds (:func:`pipeline.metrics.seed_paired_bootstrap`: every seed's test set is resampled
within that seed, and the statistic is the mean over seeds of the per-seed difference).
``python -m pipeline.table1 --measured reports/measured`` builds Table 1 from these files.

Each seed's test predictions are committed beside the row
(``reports/measured/<setting>/<experiment>.npz``), so seeds run later, in another clone
without this one's DVC cache, pool with the committed ones: run the new seeds, then the
same command (``--fresh`` starts the row over).
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.aggregate import ExperimentResult, aggregate, exp_show, parse_exp_show
from pipeline.artifacts import (
    BASELINE_SCORES,
    CONFIDNET_SCORES,
    FINETUNED_SCORES,
    REPORTS,
    features_path,
)
from pipeline.io import atomic_write_json, atomic_write_npz, atomic_write_text, load_npz
from pipeline.metrics import comparison, seed_paired_bootstrap
from pipeline.outputs import Features
from pipeline.report import paper_table, percent
from pipeline.tables import markdown_table

MEASURED = REPORTS / "measured"
CHALLENGERS = ("confidnet_finetuned", "confidnet")
BASELINES = ("mcp", "mc_dropout", "trustscore")
PAIRED_METRICS = ("aupr_error", "auroc", "fpr_at_95tpr", "aurc")
PAPER_METRICS = (("fpr_at_95tpr", "FPR-95%-TPR"), ("aupr_error", "AUPR-Error"),
                 ("aupr_success", "AUPR-Success"), ("auroc", "AUROC"))
ROWS = (("mcp", "MCP"), ("mc_dropout", "MC Dropout"), ("trustscore", "TrustScore"),
        ("confidnet_finetuned", "ConfidNet"), ("confidnet", "ConfidNet, phase 1"))
PAPER_KEY = {"confidnet_finetuned": "confidnet"}


def score_path(method: str) -> Path:
    """Where the evaluate stage reads ``method``'s scores (see ``stages/evaluate.py``)."""
    if method == "confidnet":
        return CONFIDNET_SCORES
    if method == "confidnet_finetuned":
        return FINETUNED_SCORES
    return BASELINE_SCORES / f"{method}.npz"


def read_npz(path: Path, rev: str, repo: str = ".") -> dict[str, np.ndarray]:
    """A DVC-tracked ``.npz`` as it is in experiment or commit ``rev`` (from the cache)."""
    import dvc.api

    with dvc.api.open(str(path), repo=repo, rev=rev, mode="rb") as handle:
        raw = handle.read()
    with np.load(io.BytesIO(raw)) as arrays:
        return {k: arrays[k] for k in arrays.files}


@dataclass(frozen=True)
class SeedRun:
    """One seed of a measured row: its experiment's metrics and params, and the test
    predictions the paired bootstrap needs (each method's scores, the classifier's
    correctness)."""

    result: ExperimentResult
    scores: dict[str, np.ndarray]
    correct: np.ndarray
    wall_time_s: dict[str, float]


def from_experiments(results: Sequence[ExperimentResult], repo: str = ".") -> list[SeedRun]:
    """The seed runs of finished DVC experiments: test predictions from DVC's cache,
    stage wall times from MLflow."""
    times = wall_times([r.name for r in results])
    runs = []
    for result in results:
        test = read_npz(features_path("test"), result.rev, repo)
        correct = Features(test["features"], test["logits"], test["labels"]).correct
        methods = [m for m in (*BASELINES, *CHALLENGERS) if m in result.test["methods"]]
        scores = {m: read_npz(score_path(m), result.rev, repo)["test"] for m in methods}
        runs.append(SeedRun(result, scores, correct, times[result.name]))
    return runs


def predictions_path(folder: Path, setting: str, experiment: str) -> Path:
    return folder / setting / f"{experiment}.npz"


def save_predictions(folder: Path, setting: str, runs: Sequence[SeedRun]) -> None:
    """Commit-sized test predictions of every run (a few hundred kB each), so a later
    session can pool new seeds with these without their DVC cache."""
    for run in runs:
        atomic_write_npz(predictions_path(folder, setting, run.result.name),
                         correct=run.correct, **run.scores)


def committed_runs(folder: Path, setting: str) -> list[SeedRun]:
    """The seed runs of the committed row of ``setting`` (none if it has no row)."""
    path = folder / f"{setting}.json"
    if not path.exists():
        return []
    row = json.loads(path.read_text())
    runs = []
    for entry in row["runs"]:
        arrays = load_npz(predictions_path(folder, setting, entry["experiment"]))
        result = ExperimentResult(entry["experiment"], {**row["params"], "seed": entry["seed"]},
                                  entry["test"], "", entry["git_commit"])
        runs.append(SeedRun(result, {k: v for k, v in arrays.items() if k != "correct"},
                            arrays["correct"], entry["wall_time_s"]))
    return runs


def wall_times(names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Seconds each stage of each experiment ran, from the finished MLflow runs its stages
    logged (tags ``dvc_exp_name``, ``dvc_stage``). A stage DVC restored from its run cache
    did not run, so it has no time here; an untracked experiment has none at all."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.runtime import project_root
    from pipeline.tracking import tracking_uri, uses_default_store

    empty: dict[str, dict[str, float]] = {name: {} for name in names}
    uri = tracking_uri()
    if uses_default_store(uri) and not (project_root() / "mlflow.db").exists():
        return empty  # nothing was tracked here; do not create a store
    try:
        client = mlflow.MlflowClient(uri)
        experiments = [e.experiment_id for e in client.search_experiments()]
        for name in names:
            for run in client.search_runs(experiments, f"tags.dvc_exp_name = '{name}'",
                                          max_results=100):
                stage = run.data.tags.get("dvc_stage")  # none: the pipeline's parent run
                if stage and run.info.status == "FINISHED" and run.info.end_time:
                    empty[name][stage] = (run.info.end_time - run.info.start_time) / 1000
        return empty
    except (MlflowException, OSError):  # an unreachable store only loses the timing
        return {name: {} for name in names}


def _minutes(stages: Mapping[str, float]) -> str:
    if not stages:
        return "n/a"
    return f"{sum(stages.values()) / 60:.0f} min ({', '.join(sorted(stages))})"


def select(results: Sequence[ExperimentResult], setting: str,
           names: Sequence[str] | None, required: bool = True) -> list[ExperimentResult]:
    """The experiments of ``setting`` at the full budget (or exactly ``names``), which
    must share every param but ``seed``; none is an error only if ``required``."""
    if names:
        chosen = [r for r in results if r.name in names]
        missing = sorted(set(names) - {r.name for r in chosen})
        if missing:
            raise SystemExit(f"error: no finished experiment named {', '.join(missing)}")
    else:
        chosen = [r for r in results if r.params.get("setting") == setting
                  and r.params.get("budget") == "full" and r.name != "workspace"]
    groups = aggregate(chosen)
    if not chosen and not required:
        return []
    if not chosen:
        raise SystemExit(f"error: no finished experiment with setting={setting} and "
                         "budget=full; run them first (see `python -m pipeline.measured -h`)")
    if len(groups) > 1:
        raise SystemExit(f"error: the experiments of {setting} differ in more than the seed; "
                         "name the ones to aggregate with --experiments")
    return sorted(chosen, key=lambda r: r.params["seed"])


def measure(runs: Sequence[SeedRun], resamples: int, seed: int = 0) -> dict[str, Any]:
    """The measured row of ``runs`` (one setting, several seeds): see the module doc."""
    runs = sorted(runs, key=lambda r: r.result.params["seed"])
    results = [r.result for r in runs]
    groups = aggregate(results)
    if len(groups) != 1:
        raise SystemExit("error: the runs differ in more than the seed; aggregate them apart")
    seeds = [r.params["seed"] for r in results]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"error: a seed appears more than once ({seeds}); pass the "
                         "experiments to keep with --experiments")
    group = groups[0]
    methods = [m for m in (*BASELINES, *CHALLENGERS) if m in group["methods"]]
    summary = {}
    for method in methods:
        summary[method] = {
            metric: {**stats, "per_seed": [r.test["methods"][method].get(metric)
                                           for r in results]}
            for metric, stats in group["methods"][method].items()}
    paired = {}
    for challenger in CHALLENGERS:
        for baseline in BASELINES:
            if challenger in methods and baseline in methods:
                paired[f"{challenger}-{baseline}"] = seed_paired_bootstrap(
                    [r.scores[challenger] for r in runs], [r.scores[baseline] for r in runs],
                    [r.correct for r in runs], PAIRED_METRICS, resamples, seed)
    return {
        "setting": group["params"]["setting"],
        "seeds": seeds,
        "experiments": [r.name for r in results],
        "git_commit": results[0].baseline,
        # experiments queued at different commits (code that changes no stage's result,
        # e.g. a new report) each name their own
        "git_commits": {r.name: r.baseline for r in results},
        "params": group["params"],
        "test_errors": group["test_errors"],
        "test_sizes": group["test_sizes"],
        "methods": summary,
        "paired": paired,
        "bootstrap": {"resamples": resamples, "seed": seed,
                      "scheme": "within-seed resampling of the test set, mean over seeds "
                                "of the per-seed difference; 95% percentile interval"},
        "wall_time_s": {r.result.name: r.wall_time_s for r in runs},
        "runs": [{"experiment": r.result.name, "seed": r.result.params["seed"],
                  "git_commit": r.result.baseline, "test": r.result.test,
                  "wall_time_s": r.wall_time_s} for r in runs],
    }


def _commits(row: Mapping[str, Any]) -> str:
    commits = row.get("git_commits") or {}
    if len(set(commits.values())) <= 1:
        return f"commit `{row['git_commit'][:12]}`"
    # In the row's experiment order: the JSON is written with sorted keys, so the mapping's
    # own order differs between a fresh row and one read back.
    names = [name for name in row.get("experiments", []) if name in commits]
    return "commits " + ", ".join(f"`{commits[name][:12]}` ({name})" for name in names)


def paper_row(setting: str) -> dict[str, Any] | None:
    """The paper's Table 1 row of ``setting`` itself (no closest-setting stand-in)."""
    found = paper_table(setting)
    return found[1] if found and found[0] == setting else None


def render(row: Mapping[str, Any], paper: Mapping[str, Any] | None) -> str:
    """The measured row in the paper's Table 1 layout, ours beside the paper's per cell."""
    seeds = row["seeds"]
    lines = [
        f"# Measured: `{row['setting']}`, {len(seeds)} seeds, full recipe", "",
        f"Built by `python -m pipeline.measured {row['setting']}` from the DVC experiments "
        f"{', '.join(row['experiments'])} (seeds {', '.join(map(str, seeds))}), run at "
        f"{_commits(row)}. Test split, percent. Each cell: ours as mean ± "
        "sample std over the seeds, the paper's value (Table 1) in parentheses.", ""]
    methods = [(method, label) for method, label in ROWS if method in row["methods"]]
    cells = []
    for method, label in methods:
        paper_row = (paper or {}).get(PAPER_KEY.get(method, method)) or {}
        if method == "confidnet":
            paper_row = {}  # the paper's Table 1 reports ConfidNet after fine-tuning only
        cells.append([label, *(_beside_paper(row["methods"][method].get(metric, {}),
                                             paper_row.get(metric))
                               for metric, _ in PAPER_METRICS)])
    lines.append(markdown_table(["Method", *(title for _, title in PAPER_METRICS)], cells))
    accuracy = row["methods"].get("mcp", {}).get("accuracy", {})
    lines += ["", f"Classifier test accuracy {percent(accuracy.get('mean'))} ± "
              f"{percent(accuracy.get('std'))}%; test errors per seed: "
              f"{', '.join(map(str, row['test_errors']))} of {row['test_sizes'][0]}.", "",
              "## Per seed (test AUPR-Error, %)", ""]
    cells = []
    for i, seed in enumerate(seeds):
        cells.append([seed, row["experiments"][i], row["test_errors"][i],
                      *(percent(row["methods"][m]["aupr_error"]["per_seed"][i])
                        for m, _ in methods),
                      _minutes(row["wall_time_s"].get(row["experiments"][i], {}))])
    lines.append(markdown_table(
        ["Seed", "experiment", "errors", *(label for _, label in methods),
         "wall time (stages that ran)"], cells))
    lines += ["", "## ConfidNet against each baseline, pooled over the seeds", "",
              "Paired bootstrap: every seed's test set resampled within that seed "
              f"({row['bootstrap']['resamples']} resamples), the statistic is the mean over "
              "seeds of ConfidNet minus the baseline (percentage points; for FPR and AURC "
              "lower is better). 'better' / 'worse': the 95% interval excludes zero.", ""]
    cells = []
    for name, by_metric in row["paired"].items():
        challenger, baseline = name.split("-")
        label = f"{dict(ROWS)[challenger]} − {dict(ROWS)[baseline]}"
        for metric, stats in by_metric.items():
            low, high = stats["ci"]
            cells.append([label, metric, f"{100 * stats['mean_diff']:+.2f}",
                          f"[{100 * low:+.2f}, {100 * high:+.2f}]",
                          ", ".join(f"{100 * v:+.2f}" for v in stats["per_seed"]),
                          comparison(metric, low, high)])
    lines.append(markdown_table(["Comparison", "metric", "mean difference", "95% interval",
                                 "per seed", "verdict"], cells))
    return "\n".join(lines) + "\n"


def _beside_paper(stats: Mapping[str, Any], theirs: float | None) -> str:
    """Ours as mean ± std (percent), the paper's value in parentheses (— where none)."""
    return (f"{percent(stats.get('mean'))} ± {percent(stats.get('std'))} "
            f"({'—' if theirs is None else f'{theirs:.2f}'})")


def summary(row: Mapping[str, Any], paper: Mapping[str, Any] | None) -> str:
    """A short markdown summary of a measured row (the README's "What we found" quotes it
    between markers; a test keeps the two equal)."""
    lines = [f"`{row['setting']}`, {len(row['seeds'])} seeds, full recipe, test split "
             "(%; mean ± std, paper in parentheses):", ""]
    cells = []
    for method, label in ROWS:
        if method not in row["methods"] or method == "confidnet":
            continue
        paper_row = (paper or {}).get(PAPER_KEY.get(method, method)) or {}
        cells.append([label, *(_beside_paper(row["methods"][method][metric],
                                             paper_row.get(metric))
                               for metric in ("aupr_error", "auroc", "fpr_at_95tpr"))])
    lines += [markdown_table(["Method", "AUPR-Error", "AUROC", "FPR-95%-TPR"], cells), ""]
    for baseline in BASELINES:
        stats = row["paired"].get(f"confidnet_finetuned-{baseline}", {}).get("aupr_error")
        if stats is None:
            continue
        low, high = stats["ci"]
        per_seed = ", ".join(f"{100 * v:+.2f}" for v in stats["per_seed"])
        lines.append(f"- ConfidNet − {dict(ROWS)[baseline]}, AUPR-Error: "
                     f"{100 * stats['mean_diff']:+.2f} points, 95% interval "
                     f"[{100 * low:+.2f}, {100 * high:+.2f}] "
                     f"({comparison('aupr_error', low, high)}); per seed {per_seed}.")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("setting", help="the preset whose experiments to aggregate")
    parser.add_argument("--experiments", nargs="+", metavar="NAME",
                        help="exactly these experiments (default: every finished one of "
                             "the setting at budget=full, which must differ only in seed)")
    parser.add_argument("--resamples", type=int, default=None,
                        help="bootstrap resamples (default: the runs' evaluate."
                             "bootstrap_resamples)")
    parser.add_argument("--out", type=Path, default=MEASURED)
    parser.add_argument("--all-commits", action="store_true",
                        help="include experiments of every commit, not only HEAD's")
    parser.add_argument("--fresh", action="store_true",
                        help="ignore the committed row's seeds instead of pooling with them")
    args = parser.parse_args(argv)
    committed = [] if args.fresh else committed_runs(args.out, args.setting)
    results = select(parse_exp_show(exp_show(all_commits=args.all_commits)), args.setting,
                     args.experiments, required=not committed)
    new = from_experiments(results)
    names = {r.result.name for r in new}
    runs = [r for r in committed if r.result.name not in names] + new
    resamples = args.resamples or runs[0].result.params["evaluate"]["bootstrap_resamples"]
    row = measure(runs, resamples)
    out = args.out / f"{args.setting}.json"
    save_predictions(args.out, args.setting, new)
    atomic_write_json(out, row)
    atomic_write_text(out.with_suffix(".md"), render(row, paper_row(args.setting)))
    print(f"wrote {out} and {out.with_suffix('.md')}: {len(runs)} seeds "
          f"({len(new)} from experiments, {len(runs) - len(new)} from the committed row)")


def load_measured(folder: Path = MEASURED) -> list[dict[str, Any]]:
    """Every committed measured row, as groups that ``pipeline.table1`` can lay out."""
    rows = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    return [{"params": r["params"], "seeds": r["seeds"], "experiments": r["experiments"],
             "test_errors": r["test_errors"], "test_sizes": r["test_sizes"],
             "methods": r["methods"]} for r in rows]


if __name__ == "__main__":
    main()
