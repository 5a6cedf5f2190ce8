"""Where the stages put things: the one list of every stage's files.

``dvc.yaml`` declares the same files (its ``outs``, ``metrics`` and ``plots``, and the
data among its ``deps``); ``tests/test_dvc_yaml.py`` checks that both agree, so a path
changes here and in ``dvc.yaml`` together or the tests fail.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DATA = Path("data")
MODELS = Path("models")
CLASSIFIER = MODELS / "classifier.pt"
CONFIDNET = MODELS / "confidnet.pt"
CONFIDNET_FINETUNED = MODELS / "confidnet_finetuned.pt"
FEATURES = Path("features")
SCORES = Path("scores")
BASELINE_SCORES = SCORES / "baselines"
CONFIDNET_SCORES = SCORES / "confidnet.npz"
FINETUNED_SCORES = SCORES / "confidnet_finetuned.npz"
METRICS = Path("metrics")
CLASSIFIER_METRICS = METRICS / "classifier.json"
CONFIDNET_METRICS = METRICS / "train_confidnet.json"
FINETUNE_METRICS = METRICS / "finetune.json"
TEST_METRICS = METRICS / "evaluate.json"
VALIDATION_METRICS = METRICS / "validation.json"
INTERVALS = METRICS / "intervals.json"
SIGNIFICANCE = METRICS / "significance.json"
# The pipeline's only DVC metrics file (pipeline.headline); every other file of metrics/
# is a plain output.
HEADLINE = METRICS / "headline.json"
PLOTS = Path("plots")
CLASSIFIER_CURVES = PLOTS / "classifier_curves.csv"
CONFIDNET_CURVES = PLOTS / "confidnet_curves.csv"
FINETUNE_CURVES = PLOTS / "finetune_curves.csv"
RISK_COVERAGE = PLOTS / "risk_coverage.csv"
PR_ERROR = PLOTS / "pr_error.csv"
RUNS = Path("runs")
REPORTS = Path("reports")
REPORT = REPORTS / "report.md"
FIGURES = REPORTS / "figures"
# Read by the report stage: the paper's numbers and the report's template, shipped with
# the package.
PAPER_RESULTS = Path("pipeline") / "paper_results.yaml"
REPORT_TEMPLATE = Path("pipeline") / "templates" / "report.md.j2"


def features_path(split: str) -> Path:
    return FEATURES / f"{split}.npz"


def run_record_path(stage: str) -> Path:
    """``runs/<stage>.json``: what the stage logged to MLflow, and where (see
    :meth:`pipeline.tracking.StageRun.record`)."""
    return RUNS / f"{stage}.json"


@dataclass(frozen=True)
class StageFiles:
    """The data a stage reads (besides its code and params) and the files it writes."""

    inputs: tuple[Path, ...]
    outputs: tuple[Path, ...]


# Every stage of dvc.yaml, in its order.
STAGE_ORDER = ("download", "train_classifier", "extract_features", "train_confidnet",
               "finetune", "baselines", "evaluate", "report")

STAGES: dict[str, StageFiles] = {
    "download": StageFiles((), (run_record_path("download"), DATA)),
    "train_classifier": StageFiles(
        (DATA,),
        (run_record_path("train_classifier"), CLASSIFIER, CLASSIFIER_METRICS,
         CLASSIFIER_CURVES)),
    "extract_features": StageFiles(
        (DATA, CLASSIFIER), (run_record_path("extract_features"), FEATURES)),
    "train_confidnet": StageFiles(
        (DATA, FEATURES, CLASSIFIER),
        (run_record_path("train_confidnet"), CONFIDNET, CONFIDNET_SCORES, CONFIDNET_METRICS,
         CONFIDNET_CURVES)),
    "finetune": StageFiles(
        (DATA, FEATURES, CLASSIFIER, CONFIDNET),
        (run_record_path("finetune"), CONFIDNET_FINETUNED, FINETUNED_SCORES, FINETUNE_METRICS,
         FINETUNE_CURVES)),
    "baselines": StageFiles(
        (DATA, FEATURES, CLASSIFIER), (run_record_path("baselines"), BASELINE_SCORES)),
    "evaluate": StageFiles(
        (FEATURES, SCORES),
        (run_record_path("evaluate"), HEADLINE, TEST_METRICS, VALIDATION_METRICS, INTERVALS,
         SIGNIFICANCE, RISK_COVERAGE, PR_ERROR)),
    # The report reads no run record: it names no run id (see stages/report.py).
    "report": StageFiles(
        (PAPER_RESULTS, REPORT_TEMPLATE, DATA, FEATURES, SCORES, METRICS),
        (run_record_path("report"), REPORT, FIGURES)),
}
