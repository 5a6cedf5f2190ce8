"""``reports/report.md`` from its template (``pipeline/templates/report.md.j2``): every
number filled in from the data, the tables from ``pipeline.tables``, no placeholder left;
identical ConfidNet rows merged, one paired row per baseline with its direction, a verdict
against MCP and the best baseline, and nothing that varies between runs of the same
inputs."""

from __future__ import annotations

import re
from typing import Any

import jinja2
import numpy as np
import pytest
from conftest import table_row, table_rows

from pipeline.report import (
    FINAL,
    PHASE1,
    TABLE_COLUMNS,
    beside_paper_table,
    difference_text,
    fixed,
    merged_confidnet,
    method_labels,
    paired_table,
    paper_rows,
    paper_table,
    plural,
    points,
    render_report,
    results_table,
    verdict,
)

BASELINES = ("mcp", "mcp_temperature", "mc_dropout", "trustscore")
METHODS = (*BASELINES, PHASE1, FINAL, "tcp_oracle")
MERGED = "ConfidNet (fine-tuning kept its phase-1 weights: epoch 0)"


def _test_metrics() -> dict[str, dict[str, float]]:
    test = {m: {**{k: 0.1 + 0.01 * i + 0.001 * j for j, (k, _, _) in enumerate(TABLE_COLUMNS)},
                "accuracy": 0.9812} for i, m in enumerate(METHODS)}
    # The oracle's E-AURC as the old subtraction left it: a rounding error below zero.
    test["tcp_oracle"]["eaurc"] = -6.9e-18
    return test


def _interval(difference: float, low: float, high: float) -> dict[str, Any]:
    return {"difference": difference, "ci_low": low, "ci_high": high,
            "significant": bool(low > 0 or high < 0)}


# ConfidNet minus each baseline, as metrics/significance.json holds it (both phases).
PAIRED = {
    "mcp": {"aupr_error": _interval(0.05, 0.02, 0.08),
            "aurc": _interval(-0.0012, -0.0015, -0.0004)},
    "mcp_temperature": {"aupr_error": _interval(0.01, -0.01, 0.03),
                        "aurc": _interval(0.0, -0.001, 0.001)},
    "mc_dropout": {"aupr_error": _interval(0.04, 0.01, 0.07),
                   "aurc": _interval(-0.002, -0.004, 0.0005)},
    "trustscore": {"aupr_error": _interval(-0.03, -0.05, -0.01),
                   "aurc": _interval(0.003, 0.001, 0.005)},
}
SIGNIFICANCE = {PHASE1: PAIRED, FINAL: PAIRED}


def _data(setting: str = "mnist_mlp", merged: str | None = None,
          errors: int = 188) -> dict[str, Any]:
    test = _test_metrics()
    labels = method_labels(list(test), merged)
    params = {"setting": setting, "classifier": {"model": "mlp"}, "loss": "mse",
              "criterion": "aupr", "evaluate": {"bootstrap_resamples": 1000}, "seed": 3,
              "tracking": {"experiment": "confidnet"}, "checksums": {}}
    found = paper_table(setting)
    if found is None:
        paper = None
    elif found[0] == setting:
        paper = {"same_setting": True, "row": found[1],
                 "table": beside_paper_table(test, found[1], labels)}
    else:
        paper = {"same_setting": False, "row": found[1], "table": paper_rows(found[1])}
    return {
        "params": params, "params_yaml": "setting: x\nchecksums: {}",
        "verdict": "The verdict sentence.",
        "evaluation": {"methods": test, "errors": errors, "size": 10000}, "test": test,
        "validation": {"errors": 1, "size": 500}, "classifier": {"best_epoch": 7,
                                                                 "val_accuracy": 0.97},
        "split": {"dataset": "mnist", "sizes": {"train": 50000, "val": 500, "test": 10000},
                  "seed": 0},
        "confidnet": {"best_epoch": 3, "train_errors": 321, "train_size": 50000},
        "finetune": {"best_epoch": 0 if merged else 2, "val_aupr_error_before": 0.4,
                     "val_aupr_error": 0.45},
        "merged": merged, "final_label": labels[FINAL],
        "results_table": results_table(test, {"mcp": {"aupr_error": (0.1, 0.2)}}, labels),
        "paper": paper, "paired_table": paired_table(SIGNIFICANCE, labels),
        "figures": [("risk_coverage.png", "Risk-coverage curves.")],
    }


def test_report_fills_in_every_number() -> None:
    text = render_report(_data())
    prose = text.split("```yaml")[0]
    assert "{" not in prose and "}" not in prose, "unformatted placeholder in the report"
    assert text.startswith("# Failure prediction with ConfidNet: `mnist_mlp`\n")
    assert "The verdict sentence." in text
    assert "- Dataset `mnist`: 50000 train / 500 validation / 10000 test samples " \
           "(seeded split, seed 0)." in text
    assert "(97.00%). Test accuracy 98.12%: **188 errors among 10000 test samples**" in text
    assert "**321 classifier errors among 50000 samples**. Epoch 3" in text
    assert "validation AUPR-Error 40.00% before, 45.00% at the kept epoch 2" in text
    assert "(1000 resamples of the test split, seed 3)" in text
    assert "These numbers come from one seed (3)." in text
    assert table_row(text, "MCP (baseline)")[1] == "10.10 [10.00, 20.00]"
    assert "![Risk-coverage curves.](figures/risk_coverage.png)\n\n*Risk-coverage curves.*\n" \
        in text
    assert text.endswith("```yaml\nsetting: x\nchecksums: {}\n```\n")
    # a list stays one list: no blank line inside the setup bullets
    setup = text.split("## Setup\n\n")[1].split("\n\n")[0]
    assert [line[:2] for line in setup.splitlines()] == ["- "] * 5


def test_counts_are_pluralised() -> None:
    assert (plural(0, "error"), plural(1, "error"), plural(2, "error")) == (
        "0 errors", "1 error", "2 errors")
    text = render_report(_data(errors=1))
    assert "**1 error among 10000 test samples**" in text
    assert "whose split holds 1 error among 500 samples." in text
    assert not re.search(r"\b1 errors\b", text)


def test_a_rounded_zero_has_no_sign() -> None:
    assert fixed(-6.9e-18) == "0.00" and fixed(1e-18, signed=True) == "0.00"
    assert fixed(-0.00004) == "0.00" and points(-0.00004) == "0.00"
    assert points(0.0123) == "+1.23" and points(-0.0123) == "-1.23"
    assert fixed(-0.01) == "-1.00"  # a real negative keeps its sign
    text = render_report(_data())
    assert table_row(text, "TCP oracle (uses labels)")[5] == "0.00"  # E-AURC of -7e-18
    assert not re.search(r"[-+]0\.0+(?!\d*[1-9])\b", text), "a signed zero in the report"


def test_a_difference_gets_the_decimals_that_keep_its_sign_visible() -> None:
    """An AURC difference of hundredths of a point whose interval excludes zero must not
    print a bound of 0.00 next to 'better'."""
    assert difference_text(0.05, 0.02, 0.08) == "+5.00 [+2.00, +8.00]"
    assert difference_text(-0.00012, -0.00015, -0.00004) == "-0.012 [-0.015, -0.004]"
    assert difference_text(0.0, -0.001, 0.001) == "0.00 [-0.10, +0.10]"


def test_identical_confidnet_phases_are_one_row() -> None:
    same = {"val": np.array([0.1, 0.5]), "test": np.array([0.2, 0.9, 0.3])}
    copy = {split: values.copy() for split, values in same.items()}
    assert merged_confidnet(same, copy, kept_epoch=0) == MERGED
    assert "epoch 4" in (merged_confidnet(same, copy, kept_epoch=4) or "")
    changed = {**copy, "test": np.array([0.2, 0.9, 0.30000001])}
    assert merged_confidnet(same, changed, kept_epoch=0) is None  # scores decide, not epoch
    assert merged_confidnet(same, {"test": same["test"]}, kept_epoch=0) is None

    labels = method_labels(list(METHODS), MERGED)
    assert PHASE1 not in labels and labels[FINAL] == MERGED
    assert list(method_labels(list(METHODS))) == list(METHODS)

    text = render_report(_data(merged=MERGED))
    results = text.split("## Test results")[1].split("###")[0]
    firsts = [row[0] for row in table_rows(results)]
    assert firsts.count(MERGED) == 1, "the merged row, once in the results table"
    firsts = [row[0] for row in table_rows(text)]
    assert "ConfidNet, phase 1" not in firsts and "ConfidNet, fine-tuned" not in firsts
    assert f'so the tables show them as one row, "{MERGED}"' in text
    assert "Phase 1 against the same baselines" not in text
    apart = render_report(_data())
    assert {"ConfidNet, phase 1", "ConfidNet, fine-tuned"} <= {r[0] for r in table_rows(apart)}
    assert "Phase 1 against the same baselines is in `metrics/significance.json`." in apart


def test_paired_table_has_one_row_per_baseline_with_a_direction() -> None:
    table = paired_table(SIGNIFICANCE, method_labels(list(METHODS)))
    rows = table_rows(table)
    assert rows[0] == ["Baseline", "AUPR-Error difference [95% CI]", "AUPR-Error: ConfidNet is",
                       "AURC difference [95% CI]", "AURC: ConfidNet is"]
    assert [r[0] for r in rows[1:]] == ["MCP (baseline)", "MCP, temperature-scaled",
                                        "MC Dropout", "TrustScore"]  # no oracle, no ConfidNet
    # AUPR-Error: higher is better; AURC: lower is better, so a negative difference wins.
    assert table_row(table, "MCP (baseline)") == [
        "+5.00 [+2.00, +8.00]", "better", "-0.12 [-0.15, -0.04]", "better"]
    assert table_row(table, "MCP, temperature-scaled") == [
        "+1.00 [-1.00, +3.00]", "n.s.", "0.00 [-0.10, +0.10]", "n.s."]
    assert table_row(table, "TrustScore") == [
        "-3.00 [-5.00, -1.00]", "worse", "+0.30 [+0.10, +0.50]", "worse"]
    text = render_report(_data())
    assert "Every difference is **ConfidNet minus the baseline**, in percentage points." in text
    assert "significant" not in table  # the old yes/no column said no direction


def test_the_verdict_is_against_mcp_and_the_best_baseline() -> None:
    test = _test_metrics()
    labels = method_labels(list(test))
    text = verdict(test, SIGNIFICANCE, 188, labels)
    assert text.startswith("On the test split's 188 errors, ConfidNet, fine-tuned reaches an "
                           "AUPR-Error of 15.10%.")
    assert ("Against the paper's baseline, MCP (10.10%), the difference is +5.00 points, 95% "
            "interval [+2.00, +8.00]: ConfidNet is better") in text
    # TrustScore has the highest AUPR-Error of the baselines
    assert ("Against the best baseline of this run, TrustScore (13.10%), the difference is "
            "-3.00 points, 95% interval [-5.00, -1.00]: ConfidNet is worse") in text

    test["mcp"]["aupr_error"] = 0.9
    alone = verdict(test, SIGNIFICANCE, 1, labels)
    assert alone.startswith("On the test split's 1 error,")
    assert "MCP is also the best baseline of this run." in alone
    assert "TrustScore" not in alone

    merged = verdict(_test_metrics(), SIGNIFICANCE, 188, method_labels(list(METHODS), MERGED))
    assert f"{MERGED} reaches" in merged
    not_significant = {FINAL: {**PAIRED, "mcp": {**PAIRED["mcp"],
                                                 "aupr_error": _interval(0.01, -0.01, 0.03)}}}
    assert "+1.00 points, 95% interval [-1.00, +3.00]: not significant" in verdict(
        _test_metrics(), not_significant, 188, labels)


def test_report_puts_the_papers_value_beside_ours_where_the_setting_matches() -> None:
    same = render_report(_data("mnist_mlp"))
    assert "### Ours beside the paper's, MNIST MLP (Table 1, %)" in same
    # FPR, AUPR-Error, AUPR-Success, AUROC: ours (the paper's)
    beside = same.split("### Ours beside the paper's")[1].split("##")[0]
    assert table_row(beside, "MCP (baseline)") == [
        "10.00 (14.87)", "10.10 (37.70)", "10.20 (99.94)", "10.30 (97.13)"]
    assert table_row(beside, "ConfidNet, fine-tuned") == [
        "15.00 (11.79)", "15.10 (57.37)", "15.20 (99.95)", "15.30 (97.83)"]
    assert "ConfidNet, phase 1" not in beside  # not in the paper
    assert "The paper has no" not in same

    closest = render_report(_data("digits_mlp"))
    assert "The paper has no `digits_mlp` setting; its closest, MNIST MLP, is shown" in closest
    assert table_row(closest, "ConfidNet") == ["11.79", "57.37", "99.95", "97.83"]
    assert "Ours beside the paper's" not in closest
    none = render_report(_data("no_such_setting"))
    assert "The paper's numbers" not in none and "Ours beside" not in none
    assert "## Are the differences real?" in none


def test_report_names_where_the_runs_are_without_volatile_values() -> None:
    """No MLflow run id, git commit, absolute path or time: report.md is a DVC output, and
    the same inputs must give the same bytes. The experiment is named instead."""
    text = render_report(_data())
    where = text.split("## Where the runs are\n")[1].split("### Parameters")[0]
    assert "experiment `confidnet`" in where and "dvc exp show" in where
    prose = text.split("```yaml")[0]
    assert not re.search(r"\b[0-9a-f]{12,}\b", prose), "a run id or commit hash"
    assert not re.search(r"(?<![\w`.])/[\w.-]+/", prose), "an absolute path"
    assert not re.search(r"\d{4}-\d\d-\d\d|\d\d:\d\d", prose), "a date or time"
    assert "sqlite:////" not in prose


def test_a_missing_value_is_an_error_not_an_empty_cell() -> None:
    data = _data()
    del data["confidnet"]
    with pytest.raises(jinja2.UndefinedError, match="confidnet"):
        render_report(data)
