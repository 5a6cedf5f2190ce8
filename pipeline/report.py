"""``reports/report.md`` and its figures, generated from the stage outputs only.

Every sentence that states a result is computed from the numbers: a difference is
called a win only when its paired-bootstrap 95% interval excludes zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import yaml

from pipeline.methods import CHALLENGERS, ORACLES, PAPER_METHODS, method_label, ordered_methods
from pipeline.metrics import LOWER_IS_BETTER, comparison
from pipeline.tables import markdown_table

PAPER_RESULTS = Path(__file__).with_name("paper_results.yaml")
# The report's text, with the data filled in (shipped with the package, like the above).
TEMPLATES = Path(__file__).with_name("templates")
REPORT_TEMPLATE = "report.md.j2"

# ConfidNet after phase 1 and after fine-tuning. The fine-tuned one is the paper's full
# learning scheme (its Table 1 "ConfidNet"): the report's verdict and paired table use it.
PHASE1, FINAL = CHALLENGERS

# (key, column title, lower is better) in the paper's Table 1 order, then the
# risk-coverage metrics.
TABLE_COLUMNS: tuple[tuple[str, str, bool], ...] = tuple(
    (key, title, key in LOWER_IS_BETTER) for key, title in (
        ("fpr_at_95tpr", "FPR-95%-TPR"),
        ("aupr_error", "AUPR-Error"),
        ("aupr_success", "AUPR-Success"),
        ("auroc", "AUROC"),
        ("aurc", "AURC"),
        ("eaurc", "E-AURC"),
        ("augrc", "AUGRC"),
        ("aurc_authors", "AURC (authors)"),
        ("eaurc_authors", "E-AURC (authors)"),
    ))
# The paper's Table 1 columns, and our method beside each of its rows.
PAPER_COLUMNS = ("fpr_at_95tpr", "aupr_error", "aupr_success", "auroc")
PAPER_ROWS = {"mcp": "mcp", "mc_dropout": "mc_dropout", "trustscore": "trustscore",
              FINAL: "confidnet"}
# The paired comparisons the report shows (significance.json holds these and no others).
PAIRED_METRICS = ("aupr_error", "aurc")
# What a comparison word means for ConfidNet, in the verdict's prose.
VERDICT_WORDS = {
    "better": "ConfidNet is better (the interval excludes zero)",
    "worse": "ConfidNet is worse (the interval excludes zero)",
    "n.s.": "not significant (the interval contains zero)",
    "n/a": "undefined (no resample held both correct predictions and errors)",
}


def fixed(value: float, *, signed: bool = False, decimals: int = 2) -> str:
    """A fraction as a percentage with ``decimals`` decimals (with its sign when
    ``signed``). A value that rounds to zero prints unsigned ("0.00", never "-0.00" or
    "+0.00"): a sign on a rounded zero claims a direction the digits do not show."""
    text = f"{100 * value:{'+' if signed else ''}.{decimals}f}"
    return text.lstrip("+-") if float(text) == 0 else text


def percent(value: float | None) -> str:
    """A fraction as a percentage, two decimals; "n/a" when undefined."""
    return "n/a" if value is None or math.isnan(value) else fixed(value)


def points(value: float | None, decimals: int = 2) -> str:
    """A difference of two fractions in signed percentage points; "n/a" when undefined."""
    if value is None or math.isnan(value):
        return "n/a"
    return fixed(value, signed=True, decimals=decimals)


def difference_text(difference: float, low: float, high: float) -> str:
    """``+1.23 [+0.45, +2.01]``: a paired difference and its 95% interval in points, with
    two decimals, or up to four when a value that is not zero would print as zero (AURC
    differences are often hundredths of a point, and an interval that excludes zero must
    not print a bound of 0.00)."""
    values = (difference, low, high)
    decimals = 2
    while decimals < 4 and any(
            v != 0 and not math.isnan(v) and float(f"{100 * v:.{decimals}f}") == 0
            for v in values):
        decimals += 1
    diff, lo, hi = (points(v, decimals) for v in values)
    return f"{diff} [{lo}, {hi}]"


def plural(count: int, noun: str) -> str:
    """``1 error``, ``2 errors``, ``0 errors``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def short_label(method: str) -> str:
    """The method's name without its qualifiers, for prose: "MCP (baseline)" -> "MCP"."""
    return method_label(method).split(" (")[0].split(",")[0]


def paper_table(setting: str) -> tuple[str, dict[str, Any]] | None:
    """The paper's Table 1 row of ``setting``, or of its closest paper setting (for the
    embedded digits), as ``(paper setting, row)``; None when there is neither."""
    data = yaml.safe_load(PAPER_RESULTS.read_text())
    closest = data["closest_setting"].get(setting, setting)
    row = data["table1"].get(closest)
    return (closest, row) if row else None


def merged_confidnet(phase1: Mapping[str, np.ndarray], finetuned: Mapping[str, np.ndarray],
                     kept_epoch: int) -> str | None:
    """The label of a single ConfidNet row when fine-tuning changed no score, else None.

    Decided from the scores, not the epoch: the two phases are merged only when they give
    every sample of every split the same score, so every metric, interval and paired
    difference is the same too. ``kept_epoch`` (fine-tuning's kept epoch, 0 being the
    phase-1 model) only explains why.
    """
    if set(phase1) != set(finetuned) or not all(
            np.array_equal(phase1[split], finetuned[split]) for split in phase1):
        return None
    if kept_epoch == 0:
        return "ConfidNet (fine-tuning kept its phase-1 weights: epoch 0)"
    return f"ConfidNet (phase 1 and fine-tuned, epoch {kept_epoch}, score identically)"


def method_labels(methods: Sequence[str], merged: str | None = None) -> dict[str, str]:
    """The methods the report shows, in display order, with their labels. With ``merged``
    (see :func:`merged_confidnet`) phase 1's row is left out and the fine-tuned one, which
    stands for both, is labelled ``merged``."""
    labels = {m: method_label(m) for m in ordered_methods(methods)}
    if merged is not None and PHASE1 in labels and FINAL in labels:
        del labels[PHASE1]
        labels[FINAL] = merged
    return labels


def with_interval(value: float, interval: tuple[float, float] | None) -> str:
    if interval is None or any(math.isnan(b) for b in interval):
        return percent(value)
    # Same precision as the value: AURC-like metrics are fractions of a percent, where one
    # decimal would print an interval that seems not to contain its value.
    return f"{percent(value)} [{fixed(interval[0])}, {fixed(interval[1])}]"


def results_table(test: Mapping[str, Mapping[str, float]],
                  intervals: Mapping[str, Mapping[str, tuple[float, float]]],
                  labels: Mapping[str, str]) -> str:
    """The methods of ``labels`` as rows, the paper's Table 1 columns then the
    risk-coverage ones, each value with its bootstrap 95% interval; the best non-oracle
    value per column in bold."""
    best: dict[str, float] = {}
    for key, _, lower in TABLE_COLUMNS:
        values = [test[m][key] for m in labels
                  if m not in ORACLES and not math.isnan(test[m][key])]
        if values:
            best[key] = min(values) if lower else max(values)
    rows = []
    for method, label in labels.items():
        cells = [label]
        for key, _, _ in TABLE_COLUMNS:
            text = with_interval(test[method][key], intervals.get(method, {}).get(key))
            if method not in ORACLES and key in best and test[method][key] == best[key]:
                text = f"**{text}**"
            cells.append(text)
        rows.append(cells)
    return markdown_table(["Method", *(title for _, title, _ in TABLE_COLUMNS)], rows)


def _paper_value(row: Mapping[str, Any], method: str, key: str) -> str:
    value = row[method][key]
    return "n/a" if value is None else f"{value:.2f}"


def paper_rows(row: Mapping[str, Any]) -> str:
    """The paper's Table 1 row alone (for a setting the paper does not have)."""
    titles = dict((key, title) for key, title, _ in TABLE_COLUMNS)
    rows = [[short_label(method),
             *(_paper_value(row, theirs, k) for k in PAPER_COLUMNS)]
            for method, theirs in PAPER_ROWS.items()]
    return markdown_table(["Method (paper)", *(titles[k] for k in PAPER_COLUMNS)], rows)


def beside_paper_table(test: Mapping[str, Mapping[str, float]], row: Mapping[str, Any],
                       labels: Mapping[str, str]) -> str:
    """Ours beside the paper's Table 1 row of the same setting, cell by cell: "ours
    (paper)". The paper's ConfidNet is the full scheme, so it sits beside the fine-tuned
    one; phase 1 alone is not in the paper."""
    titles = dict((key, title) for key, title, _ in TABLE_COLUMNS)
    rows = [[labels[method],
             *(f"{percent(test[method][k])} ({_paper_value(row, theirs, k)})"
               for k in PAPER_COLUMNS)]
            for method, theirs in PAPER_ROWS.items() if method in labels]
    return markdown_table(["Method", *(titles[k] for k in PAPER_COLUMNS)], rows)


def baselines_of(labels: Mapping[str, str]) -> list[str]:
    """The methods ConfidNet is compared with: all but ConfidNet and the oracles."""
    return [m for m in labels if m not in CHALLENGERS and m not in ORACLES]


def paired_table(significance: Mapping[str, Any], labels: Mapping[str, str]) -> str:
    """One row per baseline: the fine-tuned ConfidNet minus the baseline, in percentage
    points, with the paired-bootstrap 95% interval and what it says for ConfidNet
    (better / worse / n.s., :func:`pipeline.metrics.comparison`), on AUPR-Error and AURC."""
    rows = []
    for baseline in baselines_of(labels):
        cells = [labels[baseline]]
        for key in PAIRED_METRICS:
            m = significance[FINAL][baseline][key]
            cells.append(difference_text(m["difference"], m["ci_low"], m["ci_high"]))
            cells.append(comparison(key, m["ci_low"], m["ci_high"]))
        rows.append(cells)
    titles = dict((key, title) for key, title, _ in TABLE_COLUMNS)
    headers = ["Baseline"]
    for key in PAIRED_METRICS:
        headers += [f"{titles[key]} difference [95% CI]", f"{titles[key]}: ConfidNet is"]
    return markdown_table(headers, rows)


def render_report(data: Mapping[str, Any]) -> str:
    """``reports/report.md``: ``templates/report.md.j2`` filled in with ``data`` (the stage
    outputs, the tables above as text, the verdict). A name the template uses and ``data``
    lacks is an error, not an empty string."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                             undefined=jinja2.StrictUndefined, autoescape=False,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["percent"] = percent
    env.filters["plural"] = plural
    # A classification report has no segmentation section: callers need not say so.
    return env.get_template(REPORT_TEMPLATE).render({"segmentation": None, **data})


def verdict(test: Mapping[str, Mapping[str, float]], significance: Mapping[str, Any],
            test_errors: int, labels: Mapping[str, str], noun: str = "error") -> str:
    """The plain-language result on AUPR-Error (the paper's headline metric, Sec. 3.1), from
    the numbers: the fine-tuned ConfidNet against MCP, the paper's baseline, and against the
    best baseline of this run; a side is taken only when the paired-bootstrap 95% interval
    of the difference excludes zero. ``noun`` names an error ("misclassified pixel" for a
    segmentation)."""
    def against(baseline: str, role: str) -> str:
        m = significance[FINAL][baseline]["aupr_error"]
        word = comparison("aupr_error", m["ci_low"], m["ci_high"])
        diff, interval = difference_text(m["difference"], m["ci_low"],
                                         m["ci_high"]).split(" ", 1)
        return (f"Against {role}, {short_label(baseline)} "
                f"({percent(test[baseline]['aupr_error'])}%), the difference is {diff} "
                f"points, 95% interval {interval}: {VERDICT_WORDS[word]}.")

    def score(method: str) -> float:
        value = test[method]["aupr_error"]
        return -math.inf if math.isnan(value) else value

    best = max(baselines_of(labels), key=score)
    sentences = [f"On the test split's {plural(test_errors, noun)}, {labels[FINAL]} "
                 f"reaches an AUPR-Error of {percent(test[FINAL]['aupr_error'])}%.",
                 against("mcp", "the paper's baseline")]
    if best == "mcp":
        sentences.append("MCP is also the best baseline of this run.")
    else:
        sentences.append(against(best, "the best baseline of this run"))
    return " ".join(sentences)


def save_figures(folder: Path, scores: Mapping[str, Mapping[str, np.ndarray]],
                 correct: np.ndarray, tcp: np.ndarray,
                 labels: Mapping[str, str], max_points: int | None = None,
                 ) -> list[tuple[str, str]]:
    """Risk-coverage curves (paper Fig. 3) of the paper's methods among ``labels``, and
    MCP / TCP / fine-tuned ConfidNet histograms of correct and wrong predictions (paper
    Fig. 1). Returns (file name, caption) pairs. ``max_points`` thins each curve to that
    many points, evenly spaced in rank (a segmentation's millions of pixels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.metrics import risk_coverage_curve, thinned

    folder.mkdir(parents=True, exist_ok=True)
    figures = []

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for method in (m for m in labels if m in PAPER_METHODS):
        curve = risk_coverage_curve(scores[method]["test"], correct)
        keep = thinned(curve.coverage.size, max_points)
        style = ":" if method in ORACLES else "-"
        ax.step(curve.coverage[keep] * 100, curve.risk[keep] * 100, where="post",
                linestyle=style, label=labels[method])
    ax.set_xlabel("Coverage (%)")
    ax.set_ylabel("Selective risk (%)")
    ax.set_title("Risk-coverage, test split")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "risk_coverage.png", dpi=120)
    plt.close(fig)
    figures.append(("risk_coverage.png",
                    "Risk-coverage curves of the paper's methods on the test split (paper "
                    "Fig. 3); every method's curve is in `plots/risk_coverage.csv` "
                    "(`dvc plots show`)."))

    panels = [("MCP", scores["mcp"]["test"]), ("TCP (oracle)", tcp),
              (labels[FINAL], scores[FINAL]["test"])]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    bins = np.linspace(0, 1, 41)
    for ax, (title, values) in zip(axes, panels, strict=True):
        ax.hist(values[correct == 1], bins=bins, density=True, alpha=0.6, color="tab:green",
                label=f"correct ({int(correct.sum())})")
        ax.hist(values[correct == 0], bins=bins, density=True, alpha=0.6, color="tab:red",
                label=f"wrong ({int((1 - correct).sum())})")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("confidence")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("relative density")
    fig.tight_layout()
    fig.savefig(folder / "confidence_histograms.png", dpi=120)
    plt.close(fig)
    figures.append(("confidence_histograms.png",
                    "Confidence of correct and wrong test predictions (paper Fig. 1), "
                    "each class normalised to unit area."))
    return figures


def iou_table(segmentation: Mapping[str, Any], classes: Sequence[str]) -> str:
    """Per-class IoU of the segmentation (%), one column per class; "n/a" for a class in
    neither the labels nor the predictions (left out of the mIoU)."""
    return markdown_table(list(classes), [[percent(v) for v in segmentation["per_class_iou"]]])


def pixel_maps(valid: np.ndarray, values: Mapping[str, np.ndarray],
               images: int) -> dict[str, np.ndarray]:
    """The first ``images`` images' maps ``(images, H, W)`` of per-pixel ``values`` (one per
    labelled pixel, images in order, each row-major as ``valid`` selects them); NaN at void
    pixels."""
    per_image = valid.reshape(valid.shape[0], -1).sum(axis=1)
    end = int(per_image[:images].sum())
    out = {}
    for name, pixels in values.items():
        maps = np.full(valid[:images].shape, np.nan)
        maps[valid[:images]] = pixels[:end]
        out[name] = maps
    return out


def save_segmentation_figure(folder: Path, images: np.ndarray, labels: np.ndarray,
                             maps: Mapping[str, np.ndarray], confidnet_label: str,
                             ) -> tuple[str, str]:
    """The paper's Fig. 5 for the first test images: input, ground truth, prediction, the
    prediction's errors, and the confidence maps of ConfidNet and MCP, one image per row;
    void pixels grey in every map after the ground truth. ``maps`` (see
    :func:`pixel_maps`) holds ``prediction``, ``correct``, ``confidnet`` and ``mcp``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from pipeline.camvid_labels import CLASSES, PALETTE, VOID

    grey = (0.6, 0.6, 0.6)
    palette = PALETTE / 255.0
    rows = images.shape[0]
    height, width = labels.shape[1:]
    column_width = 3.0
    fig, axes = plt.subplots(rows, 6, squeeze=False, figsize=(
        6 * column_width, rows * column_width * height / width + 1.4))
    titles = ("Input", "Ground truth", "Prediction", "Errors (red)",
              f"{short_label(FINAL)} confidence", "MCP confidence")
    confidence_map = plt.get_cmap("viridis").with_extremes(bad=grey)
    for row in range(rows):
        void = labels[row] == VOID
        prediction = palette[np.nan_to_num(maps["prediction"][row], nan=VOID).astype(int)]
        prediction[void] = palette[VOID]
        errors = np.ones((height, width, 3))
        errors[maps["correct"][row] == 0] = (0.84, 0.15, 0.16)
        errors[void] = grey
        panels = [images[row], palette[labels[row]], prediction, errors]
        for col, panel in enumerate(panels):
            axes[row, col].imshow(panel, interpolation="nearest")
        for col, name in ((4, "confidnet"), (5, "mcp")):
            shown = axes[row, col].imshow(np.ma.masked_invalid(maps[name][row]),
                                          cmap=confidence_map, vmin=0, vmax=1,
                                          interpolation="nearest")
        for col in range(6):
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
            if row == 0:
                axes[row, col].set_title(titles[col], fontsize=11)
        axes[row, 0].set_ylabel(f"test image {row}", fontsize=10)
    handles = [Patch(color=tuple(palette[k]), label=name) for k, name in enumerate(CLASSES)]
    handles.append(Patch(color=tuple(palette[VOID]), label="void (left out)"))
    handles.append(Patch(color=grey, label="void (error, confidence maps)"))
    fig.legend(handles=handles, loc="lower left", ncol=7, fontsize=9, frameon=False,
               bbox_to_anchor=(0.01, 0.0))
    fig.tight_layout(rect=(0, 0.09 if rows < 3 else 0.06, 0.93, 1))
    bar = fig.add_axes((0.94, 0.25, 0.012, 0.5))
    fig.colorbar(shown, cax=bar, label="confidence")
    folder.mkdir(parents=True, exist_ok=True)
    name = "segmentation_examples.png"
    fig.savefig(folder / name, dpi=100)
    plt.close(fig)
    return name, (f"The first {plural(rows, 'test image')} (paper Fig. 5): input, ground "
                  "truth, SegNet's prediction, its errors (red), and the per-pixel confidence "
                  f"of MCP and of {confidnet_label}, on one colour scale (low confidence "
                  "should mark the errors). Void pixels, left out of every metric, are black "
                  "in the label maps and grey in the others.")
