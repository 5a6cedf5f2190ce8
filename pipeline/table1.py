r"""The paper's Table 1, our numbers beside Corbière et al.'s, from DVC experiments.

Run every setting over several seeds as DVC experiments, then build the table::

    dvc exp run --queue -S 'seed=0,1,2' \
        -S 'setting=mnist_mlp,mnist_smallconv,svhn_smallconv,cifar10_vgg16,cifar100_vgg16'
    dvc queue start -j 1          # wait for `dvc queue status` to show them done
    python -m pipeline.table1     # writes reports/table1.md and reports/table1.json

Experiments are grouped as ``pipeline.aggregate`` groups them (every parameter but
``seed``); each group is one block of the table, under its ``setting``. Settings of the
paper that have no experiment still get a block with the paper's numbers, so the output
always shows the whole of Table 1.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline.aggregate import _differing_params, cell, experiment_groups
from pipeline.io import atomic_write_json, atomic_write_text
from pipeline.report import PAPER_RESULTS, TABLE_COLUMNS
from pipeline.tables import markdown_table
from pipeline.tracking import flatten

# The metrics of the paper's Table 1, in its column order (TABLE_COLUMNS lists them first,
# then risk-coverage metrics the paper does not report).
PAPER_METRICS = ("fpr_at_95tpr", "aupr_error", "aupr_success", "auroc")
COLUMNS: tuple[tuple[str, str], ...] = tuple(
    (key, title) for key, title, _ in TABLE_COLUMNS if key in PAPER_METRICS)

# (our method, row label, the paper's method key or None). The paper's "ConfidNet" is the
# full learning scheme, i.e. after fine-tuning; phase 1 alone is not in the paper.
ROWS: tuple[tuple[str, str, str | None], ...] = (
    ("mcp", "MCP", "mcp"),
    ("mc_dropout", "MC Dropout", "mc_dropout"),
    ("trustscore", "TrustScore", "trustscore"),
    ("confidnet_finetuned", "ConfidNet", "confidnet"),
    ("confidnet", "ConfidNet, phase 1", None),
)

DEFAULT_SETTING = "digits_mlp"  # the embedded default: runs offline, not in the paper
UNKNOWN_SETTING = "unknown"     # experiments whose params.yaml predates `setting`
# Labels of the settings the paper does not have (the paper's come from its YAML).
EXTRA_LABELS = {DEFAULT_SETTING: "Digits MLP", UNKNOWN_SETTING: "Unknown setting"}

NO_PAPER_VALUE = "—"
NOT_RUN = "not run"

# The commands that rebuild the table: queue every (setting, seed) of the paper's image
# classification settings, run them one at a time on this machine, and
# build the table once `dvc queue status` shows them done. The end-to-end test runs them.
REBUILD_COMMANDS = (
    "dvc exp run --queue -S 'setting=mnist_mlp,mnist_smallconv,svhn_smallconv,"
    "cifar10_vgg16,cifar100_vgg16' -S 'seed=0,1,2'",
    "dvc queue start -j 1",
    "python -m pipeline.table1",
)
REBUILD = "\n".join((REBUILD_COMMANDS[0],
                     f"{REBUILD_COMMANDS[1]}  # wait until `dvc queue status` shows them done",
                     REBUILD_COMMANDS[2]))


def load_paper_table1(path: Path = PAPER_RESULTS) -> dict[str, dict[str, Any]]:
    """The paper's Table 1 rows by setting, in the paper's order (the YAML's order)."""
    return dict(yaml.safe_load(path.read_text())["table1"])


def setting_of(params: Mapping[str, Any]) -> str:
    return str(params.get("setting", UNKNOWN_SETTING))


def setting_order(setting: str, paper_settings: Sequence[str]) -> tuple[int, int, str]:
    """Sort key: the paper's settings in its order, then the embedded default, then
    settings the paper does not know (alphabetically), experiments without one last."""
    if setting in paper_settings:
        return (0, list(paper_settings).index(setting), "")
    if setting == DEFAULT_SETTING:
        return (1, 0, "")
    if setting == UNKNOWN_SETTING:
        return (3, 0, "")
    return (2, 0, setting)


def table_cell(ours: Mapping[str, float] | None, paper: float | None, *, run: bool,
               seeds: int) -> str:
    """``mean ± std (paper)`` in percent: ours over the seeds (just the mean for one), the
    paper's value (a percentage already) in parentheses, "—" where it has none. A metric
    undefined on some seeds (NaN there) says on how many of them it rests."""
    if not run:
        mine = NOT_RUN
    else:
        mine = cell(ours)
        if ours and 0 < ours["n"] < seeds:
            mine += f" [{ours['n']}/{seeds} seeds]"
    theirs = NO_PAPER_VALUE if paper is None else f"{paper:.2f}"
    return f"{mine} ({theirs})"


def _classifier_accuracy(methods: Mapping[str, Mapping[str, Any]]) -> dict[str, float] | None:
    # Every method carries the same classifier accuracy; MCP's is read first because MCP
    # is always evaluated, any other method's only as a fallback.
    for method in ("mcp", *sorted(methods)):
        stats = methods.get(method, {}).get("accuracy")
        if stats is not None:
            return dict(stats)
    return None


def _methods(group_methods: Mapping[str, Mapping[str, Any]] | None,
             paper_row: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for method, _, paper_method in ROWS:
        paper_values = (paper_row or {}).get(paper_method or "", {}) or {}
        out[method] = {
            key: {"ours": (dict(group_methods[method][key])
                           if group_methods and key in group_methods.get(method, {}) else None),
                  "paper": paper_values.get(key)}
            for key, _ in COLUMNS
        }
    return out


def build_blocks(groups: Sequence[Mapping[str, Any]],
                 paper: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One block per group of ``aggregate()``, plus one "not run" block per paper setting
    without experiments, in the paper's order. Groups of one setting that differ in other
    params than seed (say ``loss``) are separate blocks, told apart by ``distinguishing``:
    the flattened params whose values differ between them."""
    by_setting: dict[str, list[Mapping[str, Any]]] = {}
    for group in groups:
        by_setting.setdefault(setting_of(group["params"]), []).append(group)
    blocks: list[dict[str, Any]] = []
    for setting in sorted(set(by_setting) | set(paper),
                          key=lambda s: setting_order(s, list(paper))):
        row = paper.get(setting)
        label = row["label"] if row else EXTRA_LABELS.get(setting, setting)
        members = by_setting.get(setting, [])
        if not members:
            blocks.append({
                "setting": setting, "label": label, "in_paper": row is not None, "run": False,
                "params": {}, "distinguishing": {}, "seeds": [], "experiments": [],
                "test_errors": [], "test_sizes": [], "accuracy": None,
                "methods": _methods(None, row)})
            continue
        differing = [k for k in _differing_params(members) if k != "setting"]
        setting_blocks: list[dict[str, Any]] = []
        for group in members:
            flat = flatten(group["params"])
            setting_blocks.append({
                "setting": setting, "label": label, "in_paper": row is not None, "run": True,
                "params": dict(group["params"]),
                "distinguishing": {k: flat.get(k) for k in differing},
                "seeds": list(group["seeds"]), "experiments": list(group["experiments"]),
                "test_errors": list(group["test_errors"]),
                "test_sizes": list(group.get("test_sizes") or []),
                "accuracy": _classifier_accuracy(group["methods"]),
                "methods": _methods(group["methods"], row),
                # a segmentation's mIoU; classification blocks have no such key
                **({"miou": dict(group["miou"])} if "miou" in group else {})})
        # Within a setting, the block with the most seeds (the main run) first, then a
        # stable order whatever order dvc listed the experiments in.
        blocks += sorted(setting_blocks, key=lambda b: (
            -len(b["seeds"]), json.dumps(b["distinguishing"], sort_keys=True)))
    return blocks


def block_title(block: Mapping[str, Any]) -> str:
    title = f"{block['label']} (`setting={block['setting']}`"
    title += "".join(f", `{k}={v}`" for k, v in block["distinguishing"].items()) + ")"
    if not block["in_paper"]:
        title += f", not in the paper: no paper values ({NO_PAPER_VALUE})"
    if not block["run"]:
        title += f", {NOT_RUN}"
    return title


def _join(values: Sequence[Any]) -> str:
    return ", ".join(str(v) for v in values)


def classifier_line(block: Mapping[str, Any]) -> str:
    """What the block's numbers rest on: the classifier's test accuracy, the seeds, the test
    errors per seed and the experiments."""
    if not block["run"]:
        return (f"No experiment with `setting={block['setting']}` yet: the paper's values "
                "only.")
    seeds = block["seeds"]
    accuracy = cell(block["accuracy"]) if block["accuracy"] else "n/a"
    sizes = {s for s in block["test_sizes"] if s is not None}
    segmentation = "miou" in block
    samples = "labelled test pixels" if segmentation else "test samples"
    of = f" of {sizes.pop()} {samples}" if len(sizes) == 1 else ""
    if segmentation:
        what, errors = "Segmentation test pixel accuracy", "misclassified test pixels"
    else:
        what, errors = "Classifier test accuracy", "test errors"
    line = (f"{what} {accuracy}% over {len(seeds)} "
            f"seed{'s' if len(seeds) != 1 else ''} ({_join(seeds)}); {errors} per seed: "
            f"{_join(block['test_errors'])}{of}; experiments: {_join(block['experiments'])}.")
    if segmentation:
        line += (f" mIoU {cell(block['miou'])}%; each pixel is a sample of the failure "
                 "metrics.")
    # The same seed run twice (a queued rerun) counts twice in the mean and std, and a
    # deterministic rerun shrinks the std: say so rather than silently drop one.
    repeated = sorted({s for s in seeds if seeds.count(s) > 1}, key=str)
    if repeated:
        line += (f" Seed {_join(repeated)} ran more than once; every run counts in the mean "
                 "and std (`dvc exp remove` the extra ones to count each seed once).")
    return line


def header(blocks: Sequence[Mapping[str, Any]]) -> list[str]:
    seeds = sorted({len(b["seeds"]) for b in blocks if b["run"]})
    over = " or ".join(str(n) for n in seeds) if seeds else "no"
    return [
        "# Table 1: failure prediction, ours beside the paper's", "",
        "Corbière et al., *Addressing Failure Prediction by Learning Model Confidence*, "
        "NeurIPS 2019, Table 1, on the test split. All values are in percent. In each cell, "
        f"ours come first as mean ± sample standard deviation over the seeds of the block "
        f"({over} seeds here; just the mean for one seed), then the paper's value in "
        f"parentheses (from the paper's own runs; {NO_PAPER_VALUE} where the paper has no "
        "number). `[k/n seeds]` marks a metric undefined on some seeds, averaged over the "
        f"k where it is defined; `{NOT_RUN}`: no experiment of that setting yet.", "",
        "**ConfidNet** is ConfidNet after fine-tuning (`confidnet_finetuned`), the paper's "
        "full learning scheme and the row its Table 1 reports. **ConfidNet, phase 1** "
        "(`confidnet`) is the head trained on frozen features before fine-tuning; the paper "
        f"does not report it separately ({NO_PAPER_VALUE}).", "",
        "Metric conventions follow `pipeline/metrics.py`: AUROC and AUPR with the "
        "definitions of scikit-learn's `roc_auc_score` and `average_precision_score` "
        "(AUPR-Error takes errors as the "
        "positive class, AUPR-Success correct predictions), FPR at 95% TPR exact over the "
        "ROC curve (TPR counts correct predictions accepted). Each block names the "
        "classifier its numbers rest on; the paper's classifiers' accuracies are not in "
        "our data (`pipeline/paper_results.yaml`) and are not shown.", "",
        "Rebuild (each setting over seeds 0, 1, 2 as DVC experiments, then this file):", "",
        "```bash", REBUILD, "```", "",
    ]


def render(blocks: Sequence[Mapping[str, Any]]) -> str:
    lines = header(blocks)
    for block in blocks:
        seeds = len(block["seeds"])
        rows = [[label, *(table_cell(block["methods"][method][key]["ours"],
                                     block["methods"][method][key]["paper"],
                                     run=block["run"], seeds=seeds)
                          for key, _ in COLUMNS)]
                for method, label, _ in ROWS]
        lines += [f"## {block_title(block)}", "", classifier_line(block), "",
                  markdown_table(["Method", *(title for _, title in COLUMNS)], rows), ""]
    return "\n".join(lines)


def _finite_or_none(value: Any) -> Any:
    # NaN (the std of one seed, a metric undefined on every seed) is not valid JSON.
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


def to_json(blocks: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The table machine-readably: ours as fractions {mean, std, n} (std null for one
    seed), the paper's values in percent as it prints them (null where it has none)."""
    return _finite_or_none({
        "units": {"ours": "fraction", "paper": "percent"},
        "columns": [{"metric": key, "title": title} for key, title in COLUMNS],
        "rows": [{"method": method, "label": label, "paper_method": paper_method}
                 for method, label, paper_method in ROWS],
        "blocks": list(blocks),
    })


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="The paper's Table 1 beside ours, from DVC experiments over seeds")
    parser.add_argument("--out", type=Path, default=Path("reports/table1.md"),
                        help="markdown output; the JSON goes beside it (.json)")
    parser.add_argument("--all-commits", action="store_true",
                        help="include experiments of every commit, not only HEAD's")
    parser.add_argument("--measured", type=Path, metavar="DIR",
                        help="build from the committed measured rows in DIR "
                             "(reports/measured, see pipeline.measured) instead of this "
                             "repository's DVC experiments")
    args = parser.parse_args(argv)
    if args.measured is not None:
        from pipeline.measured import load_measured

        groups = load_measured(args.measured)
        if not groups:
            raise SystemExit(f"error: no measured row (*.json) in {args.measured}")
    else:
        groups = experiment_groups(args.all_commits, "run the experiments first:\n" + REBUILD)
    blocks = build_blocks(groups, load_paper_table1())
    atomic_write_text(args.out, render(blocks))
    atomic_write_json(args.out.with_suffix(".json"), to_json(blocks))
    ran = [b for b in blocks if b["run"]]
    print(f"wrote {args.out} and {args.out.with_suffix('.json')} ({len(ran)} block(s) from "
          f"{sum(len(b['seeds']) for b in ran)} experiment(s); "
          f"{len(blocks) - len(ran)} paper setting(s) not run)")


if __name__ == "__main__":
    main()
