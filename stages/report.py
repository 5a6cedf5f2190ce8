"""Stage 8: ``reports/report.md`` with its figures, readable on its own."""

from __future__ import annotations

from typing import Any

import yaml

from pipeline.artifacts import (
    CLASSIFIER_METRICS,
    CONFIDNET_METRICS,
    DATA,
    FIGURES,
    FINETUNE_METRICS,
    INTERVALS,
    REPORT,
    SIGNIFICANCE,
    STAGE_ORDER,
    TEST_METRICS,
    VALIDATION_METRICS,
    run_record_path,
)
from pipeline.io import atomic_write_text, read_json
from pipeline.outputs import load_features, load_scores
from pipeline.report import (
    paper_rows,
    paper_table,
    percent,
    provenance_table,
    results_table,
    save_figures,
    significance_table,
    verdict,
)
from pipeline.stage import run_stage
from pipeline.tracking import StageRun, tracking_uri


def render(params: dict[str, Any], this_run: StageRun) -> str:
    evaluation = read_json(TEST_METRICS)
    validation = read_json(VALIDATION_METRICS)
    intervals = read_json(INTERVALS)
    significance = read_json(SIGNIFICANCE)
    classifier = read_json(CLASSIFIER_METRICS)
    confidnet = read_json(CONFIDNET_METRICS)
    finetune = read_json(FINETUNE_METRICS)
    split = read_json(DATA / "split.json")
    test, test_errors = evaluation["methods"], evaluation["errors"]
    scores = load_scores()
    test_features = load_features("test")
    figures = save_figures(FIGURES, scores, test_features.correct, scores["tcp_oracle"]["test"])
    records = [read_json(run_record_path(s)) for s in STAGE_ORDER[:-1]
               if run_record_path(s).exists()]
    records.append(this_run.record())

    out = [f"# Failure prediction with ConfidNet: `{params['setting']}`", ""]
    out += ["## Result", "", verdict(test, significance, test_errors), ""]
    accuracy = test["mcp"]["accuracy"]
    out += [
        "## Setup", "",
        f"- Dataset `{split['dataset']}`: {split['sizes']['train']} train / "
        f"{split['sizes']['val']} validation / {split['sizes']['test']} test samples "
        f"(seeded split, seed {split['seed']}).",
        f"- Classifier `{params['classifier']['model']}`, epoch {classifier['best_epoch']} kept on "
        f"validation accuracy ({percent(classifier['val_accuracy'])}%). Test accuracy "
        f"{percent(accuracy)}%: **{test_errors} errors among {evaluation['size']} test "
        f"samples**, the positives every AUPR-Error below rests on.",
        f"- ConfidNet: loss `{params['loss']}`, criterion `{params['criterion']}`, trained on the "
        f"training split, which holds **{confidnet['train_errors']} "
        f"classifier errors among {confidnet['train_size']} samples**. Epoch "
        f"{confidnet['best_epoch']} kept on validation AUPR-Error, whose split holds "
        f"{validation['errors']} errors among {validation['size']} samples.",
        "- Fine-tuning: validation AUPR-Error "
        f"{percent(finetune['val_aupr_error_before'])}% before, "
        f"{percent(finetune['val_aupr_error'])}% at the kept epoch {finetune['best_epoch']} "
        "(epoch 0 is the phase-1 model).",
        "- All methods score the same classifier's predictions; MC Dropout's score is computed "
        "for the deterministic prediction so every method faces the same errors.",
        "",
    ]
    out += [
        "## Test results in the paper's Table 1 layout (%)", "",
        results_table(test, intervals), "",
        "Each value is followed by its bootstrap 95% interval "
        f"({params['evaluate']['bootstrap_resamples']} resamples of the test split, "
        f"seed {params['seed']}). Best value per column in bold "
        "(the TCP oracle, which reads the label, excluded); a bold value is not a win unless "
        "the paired comparison below says so. Lower is better for FPR, AURC, E-AURC, AUGRC. "
        "Conventions: AUROC and AUPR with scikit-learn's definitions (the authors' choice; "
        "computed in-house, tested against scikit-learn); "
        "FPR at 95% TPR exact on the ROC curve; AURC with tied scores entering together, "
        "E-AURC against the exact oracle of the same convention, AUGRC as in Traub et al. "
        "(2024); the *authors* columns follow valeoai/ConfidNet's code (strict thresholds, "
        "full-coverage point dropped, trapezoid; closed-form oracle). See `pipeline/metrics.py`.",
        "",
    ]
    paper = paper_table(params["setting"])
    if paper is not None:
        setting, row = paper
        same = setting == params["setting"]
        note = ("" if same else
                f" The paper has no `{params['setting']}` setting; its closest, {row['label']}, "
                "is shown for scale only: a different dataset, so no cell compares directly.")
        out += [f"### The paper's numbers, {row['label']} (Table 1, %)", "", paper_rows(row), "",
                note.strip(), ""]
    out += [
        "## Are the differences real?", "",
        f"Paired bootstrap over the {evaluation['size']} test samples "
        f"({params['evaluate']['bootstrap_resamples']} resamples, seed {params['seed']}): "
        "ConfidNet minus each baseline, in points; positive is better for AUPR-Error, "
        "negative is better for AURC. Significant means the 95% interval excludes zero.", "",
        significance_table(significance), "",
        f"These numbers come from one seed ({params['seed']}). For mean ± std across seeds, "
        "run the seeds as DVC experiments and aggregate them with "
        "`python -m pipeline.aggregate` (writes `reports/seeds.md`).", "",
    ]
    out += ["## Figures", ""]
    out += [f"![{caption}](figures/{name})\n\n*{caption}*\n" for name, caption in figures]
    out += [
        "## Provenance", "",
        f"- Git commit: `{this_run.context['git_commit']}`",
        f"- DVC experiment: `{this_run.context['dvc_exp_name'] or '(none: dvc repro)'}`",
        f"- MLflow tracking URI: `{tracking_uri()}`, "
        f"experiment `{params['tracking']['experiment']}`",
        "",
        provenance_table(records),
    ]
    out += ["", "Stages restored from DVC's run cache keep the run ids of the run that computed "
            "them.", "", "### Parameters (`params.yaml`)", "", "```yaml",
            yaml.safe_dump(params, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(out)


def body(params: dict[str, Any], run: StageRun) -> None:
    atomic_write_text(REPORT, render(params, run))
    run.log_artifact(REPORT)
    for figure in sorted(FIGURES.glob("*.png")):
        run.log_artifact(figure)


if __name__ == "__main__":
    run_stage("report", body)
