"""``reports/report.md`` from its template (``pipeline/templates/report.md.j2``): every
number filled in from the data, the tables from ``pipeline.tables``, no placeholder left."""

from __future__ import annotations

from typing import Any

import jinja2
import pytest
from conftest import table_row

from pipeline.report import (
    TABLE_COLUMNS,
    paper_rows,
    paper_table,
    provenance_table,
    render_report,
    results_table,
    significance_table,
)

METHODS = ("mcp", "mc_dropout", "trustscore", "confidnet", "confidnet_finetuned", "tcp_oracle")


def _data(setting: str = "mnist_mlp") -> dict[str, Any]:
    test = {m: {**{k: 0.1 + 0.01 * i + 0.001 * j for j, (k, _, _) in enumerate(TABLE_COLUMNS)},
                "accuracy": 0.9812} for i, m in enumerate(METHODS)}
    interval = {"difference": 0.01, "ci_low": -0.01, "ci_high": 0.03, "significant": False}
    significance = {"confidnet_finetuned": {"mcp": {"aupr_error": interval, "aurc": interval}}}
    params = {"setting": setting, "classifier": {"model": "mlp"}, "loss": "mse",
              "criterion": "aupr", "evaluate": {"bootstrap_resamples": 1000}, "seed": 3,
              "tracking": {"experiment": "confidnet"}, "checksums": {}}
    found = paper_table(setting)
    records = [{"stage": "download", "params": {"seed": 0}, "metrics": {"train_size": 9},
                "steps": []},
               {"stage": "report", "params": {"seed": 0}, "metrics": {}, "steps": []}]
    return {
        "params": params, "params_yaml": "setting: x\nchecksums: {}",
        "verdict": "The verdict sentence.",
        "evaluation": {"methods": test, "errors": 188, "size": 10000}, "test": test,
        "validation": {"errors": 12, "size": 500}, "classifier": {"best_epoch": 7,
                                                                  "val_accuracy": 0.97},
        "split": {"dataset": "mnist", "sizes": {"train": 50000, "val": 500, "test": 10000},
                  "seed": 0},
        "confidnet": {"best_epoch": 3, "train_errors": 321, "train_size": 50000},
        "finetune": {"best_epoch": 2, "val_aupr_error_before": 0.4, "val_aupr_error": 0.45},
        "results_table": results_table(test, {"mcp": {"aupr_error": (0.1, 0.2)}}),
        "paper": None if found is None else {"setting": found[0], "row": found[1],
                                             "table": paper_rows(found[1])},
        "significance_table": significance_table(significance),
        "figures": [("risk_coverage.png", "Risk-coverage curves.")],
        "run": {"git_commit": "deadbeef" * 5, "dvc_exp_name": None},
        "tracking_uri": "file:mlruns", "provenance_table": provenance_table(records),
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
    assert "12 errors among 500 samples." in text
    assert "validation AUPR-Error 40.00% before, 45.00% at the kept epoch 2" in text
    assert "(1000 resamples of the test split, seed 3)" in text
    assert "These numbers come from one seed (3)." in text
    assert table_row(text, "MCP (baseline)")[1] == "10.10 [10.00, 20.00]"
    assert table_row(text, "ConfidNet, fine-tuned − MCP (baseline)") == [
        "+1.00 [-1.00, +3.00]", "no", "+1.00 [-1.00, +3.00]", "no"]
    assert "![Risk-coverage curves.](figures/risk_coverage.png)\n\n*Risk-coverage curves.*\n" \
        in text
    assert "- Git commit: `" + "deadbeef" * 5 + "`" in text
    assert "- DVC experiment: `(none: dvc repro)`" in text
    assert table_row(text, "download") == ["1", "1", "0"]
    assert table_row(text, "report") == ["1", "0", "0"]
    assert text.endswith("```yaml\nsetting: x\nchecksums: {}\n```\n")


def test_report_shows_the_papers_row_and_says_when_it_is_another_setting() -> None:
    same = render_report(_data("mnist_mlp"))
    assert "### The paper's numbers, MNIST MLP (Table 1, %)" in same
    assert table_row(same, "ConfidNet") == ["11.79", "57.37", "99.95", "97.83"]
    assert "The paper has no" not in same
    closest = render_report(_data("digits_mlp"))
    assert "The paper has no `digits_mlp` setting; its closest, MNIST MLP, is shown" in closest
    none = render_report(_data("no_such_setting"))
    assert "The paper's numbers" not in none and "## Are the differences real?" in none


def test_a_missing_value_is_an_error_not_an_empty_cell() -> None:
    data = _data()
    del data["confidnet"]
    with pytest.raises(jinja2.UndefinedError, match="confidnet"):
        render_report(data)

