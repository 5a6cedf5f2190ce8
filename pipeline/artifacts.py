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
# Segmentation only: the first test images and label maps, for the report's Figure 5.
FIGURE_IMAGES = FEATURES / "figure_images.npz"
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
# check_params's one output: the same bytes whatever the (valid) params, so that its rerun
# after a param change never reruns the stages that depend on it (see stages/check_params.py).
PARAMS_CHECKED = RUNS / "check_params.txt"
REPORTS = Path("reports")
REPORT = REPORTS / "report.md"
FIGURES = REPORTS / "figures"
# Read by the report stage: the paper's numbers and the report's template, shipped with
# the package.
PAPER_RESULTS = Path("pipeline") / "paper_results.yaml"
# CamVid's MD5 of every file, read by download (pipeline/camvid.py). A dep of every stage
# that imports pipeline.data (which registers CamVid), as tests/test_dvc_yaml.py requires
# of package data its code names.
CAMVID_MANIFEST = Path("pipeline") / "manifests" / "camvid.md5"
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


# Every stage of dvc.yaml, in its order. check_params only validates params.yaml, and every
# other stage depends on its output, so that DVC runs it first and a bad value stops the
# pipeline before DVC deletes any stage's outputs.
CHECK_PARAMS = "check_params"
STAGE_ORDER = (CHECK_PARAMS, "download", "train_classifier", "extract_features",
               "train_confidnet", "finetune", "baselines", "evaluate", "report")
# The stages that run inside pipeline.stage.run_stage: an MLflow run and a runs/<stage>.json each.
TRACKED_STAGES = STAGE_ORDER[1:]

STAGES: dict[str, StageFiles] = {
    CHECK_PARAMS: StageFiles((), (PARAMS_CHECKED,)),
    "download": StageFiles((PARAMS_CHECKED, CAMVID_MANIFEST),
                           (run_record_path("download"), DATA)),
    "train_classifier": StageFiles(
        (PARAMS_CHECKED, CAMVID_MANIFEST, DATA),
        (run_record_path("train_classifier"), CLASSIFIER, CLASSIFIER_METRICS,
         CLASSIFIER_CURVES)),
    "extract_features": StageFiles(
        (PARAMS_CHECKED, CAMVID_MANIFEST, DATA, CLASSIFIER),
        (run_record_path("extract_features"), FEATURES)),
    "train_confidnet": StageFiles(
        (PARAMS_CHECKED, CAMVID_MANIFEST, DATA, FEATURES, CLASSIFIER),
        (run_record_path("train_confidnet"), CONFIDNET, CONFIDNET_SCORES, CONFIDNET_METRICS,
         CONFIDNET_CURVES)),
    "finetune": StageFiles(
        (PARAMS_CHECKED, CAMVID_MANIFEST, DATA, FEATURES, CLASSIFIER, CONFIDNET),
        (run_record_path("finetune"), CONFIDNET_FINETUNED, FINETUNED_SCORES, FINETUNE_METRICS,
         FINETUNE_CURVES)),
    "baselines": StageFiles(
        (PARAMS_CHECKED, CAMVID_MANIFEST, DATA, FEATURES, CLASSIFIER),
        (run_record_path("baselines"), BASELINE_SCORES)),
    "evaluate": StageFiles(
        (PARAMS_CHECKED, FEATURES, SCORES),
        (run_record_path("evaluate"), HEADLINE, TEST_METRICS, VALIDATION_METRICS, INTERVALS,
         SIGNIFICANCE, RISK_COVERAGE, PR_ERROR)),
    # The report reads no run record: it names no run id (see stages/report.py).
    "report": StageFiles(
        (PARAMS_CHECKED, PAPER_RESULTS, REPORT_TEMPLATE, DATA, FEATURES, SCORES, METRICS),
        (run_record_path("report"), REPORT, FIGURES)),
}


def producers(path: Path) -> list[str]:
    """The stages whose outputs make ``path``: the stage that writes it, or every stage
    that writes something inside it (``scores/`` is made by three), in pipeline order;
    empty for a file no stage writes (one shipped with the code)."""
    return [stage for stage in STAGE_ORDER
            if any(out == path or path in out.parents for out in STAGES[stage].outputs)]


def missing_inputs(stage: str, root: Path = Path()) -> list[Path]:
    """The inputs of ``stage`` absent under ``root``, in the order it lists them: a whole
    folder when it is absent, else each absent output of another stage inside it.
    check_params's output is not counted: a stage run outside DVC validates its params
    itself. A stage this module does not list has no inputs to check."""
    found: list[Path] = []
    for path in STAGES[stage].inputs if stage in STAGES else ():
        if path == PARAMS_CHECKED:
            continue
        if not (root / path).exists():
            found.append(path)
            continue
        inside = [out for other in STAGE_ORDER if other != stage
                  for out in STAGES[other].outputs if path in out.parents]
        found += [out for out in inside if not (root / out).exists()]
    return found
