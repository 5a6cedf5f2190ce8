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
from pipeline.tables import markdown_table

PAPER_RESULTS = Path(__file__).with_name("paper_results.yaml")
# The report's text, with the data filled in (shipped with the package, like the above).
TEMPLATES = Path(__file__).with_name("templates")
REPORT_TEMPLATE = "report.md.j2"

# (key, column title, lower is better) in the paper's Table 1 order, then the
# risk-coverage metrics.
TABLE_COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("fpr_at_95tpr", "FPR-95%-TPR", True),
    ("aupr_error", "AUPR-Error", False),
    ("aupr_success", "AUPR-Success", False),
    ("auroc", "AUROC", False),
    ("aurc", "AURC", True),
    ("eaurc", "E-AURC", True),
    ("augrc", "AUGRC", True),
    ("aurc_authors", "AURC (authors)", True),
    ("eaurc_authors", "E-AURC (authors)", True),
)


def percent(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.2f}"


def paper_table(setting: str) -> tuple[str, dict[str, Any]] | None:
    """The paper's Table 1 row of ``setting``, or of its closest paper setting (for the
    embedded digits), as ``(paper setting, row)``; None when there is neither."""
    data = yaml.safe_load(PAPER_RESULTS.read_text())
    closest = data["closest_setting"].get(setting, setting)
    row = data["table1"].get(closest)
    return (closest, row) if row else None


def with_interval(value: float, interval: tuple[float, float] | None) -> str:
    if interval is None or any(math.isnan(b) for b in interval):
        return percent(value)
    # Same precision as the value: AURC-like metrics are fractions of a percent, where one
    # decimal would print an interval that seems not to contain its value.
    return f"{percent(value)} [{100 * interval[0]:.2f}, {100 * interval[1]:.2f}]"


def results_table(test: Mapping[str, Mapping[str, float]],
                  intervals: Mapping[str, Mapping[str, tuple[float, float]]]) -> str:
    """Methods as rows, the paper's Table 1 columns then the risk-coverage ones, each
    value with its bootstrap 95% interval; the best non-oracle value per column in bold."""
    methods = ordered_methods(list(test))
    best: dict[str, float] = {}
    for key, _, lower in TABLE_COLUMNS:
        values = [test[m][key] for m in methods
                  if m not in ORACLES and not math.isnan(test[m][key])]
        if values:
            best[key] = min(values) if lower else max(values)
    rows = []
    for method in methods:
        cells = [method_label(method)]
        for key, _, _ in TABLE_COLUMNS:
            text = with_interval(test[method][key], intervals.get(method, {}).get(key))
            if method not in ORACLES and key in best and test[method][key] == best[key]:
                text = f"**{text}**"
            cells.append(text)
        rows.append(cells)
    return markdown_table(["Method", *(title for _, title, _ in TABLE_COLUMNS)], rows)


def paper_rows(row: Mapping[str, Any]) -> str:
    keys = ("fpr_at_95tpr", "aupr_error", "aupr_success", "auroc")
    rows = [[method_label(method).split(",")[0],
             *("n/a" if row[method][k] is None else f"{row[method][k]:.2f}" for k in keys)]
            for method in ("mcp", "mc_dropout", "trustscore", "confidnet")]
    return markdown_table(
        ["Method (paper)", "FPR-95%-TPR", "AUPR-Error", "AUPR-Success", "AUROC"], rows)


def significance_table(significance: Mapping[str, Any]) -> str:
    rows = []
    for challenger, against in significance.items():
        for baseline, metrics in against.items():
            cells = [f"{method_label(challenger)} − {method_label(baseline)}"]
            for key in ("aupr_error", "aurc"):
                m = metrics[key]
                cells.append(f"{100 * m['difference']:+.2f} [{100 * m['ci_low']:+.2f}, "
                             f"{100 * m['ci_high']:+.2f}]")
                cells.append("yes" if m["significant"] else "no")
            rows.append(cells)
    return markdown_table(["Comparison", "AUPR-Error difference [95% CI]", "significant",
                           "AURC difference [95% CI]", "significant"], rows)


def provenance_table(records: Sequence[Mapping[str, Any]]) -> str:
    """One row per stage run record (``runs/<stage>.json``): what the stage logged to MLflow
    (and ``python -m pipeline.replay`` would log again). Records hold no run ids: the
    runs are found in MLflow by experiment and stage."""
    return markdown_table(
        ["Stage", "params", "final metrics", "per-epoch values"],
        [[r["stage"], str(len(r["params"])), str(len(r["metrics"])), str(len(r["steps"]))]
         for r in records])


def render_report(data: Mapping[str, Any]) -> str:
    """``reports/report.md``: ``templates/report.md.j2`` filled in with ``data`` (the stage
    outputs, the tables above as text, the verdict). A name the template uses and ``data``
    lacks is an error, not an empty string."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                             undefined=jinja2.StrictUndefined, autoescape=False,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["percent"] = percent
    return env.get_template(REPORT_TEMPLATE).render(data)


def verdict(test: Mapping[str, Mapping[str, float]], significance: Mapping[str, Any],
            test_errors: int) -> str:
    """The plain-language result, from the numbers: a win needs an interval above zero."""
    final = "confidnet_finetuned"
    baselines = [m for m in ordered_methods(list(test)) if m not in CHALLENGERS + ORACLES]
    best = max(baselines, key=lambda m: test[m]["aupr_error"])
    ours, theirs = test[final]["aupr_error"], test[best]["aupr_error"]
    sig = significance[final][best]["aupr_error"]
    interval = f"95% CI of the difference [{100 * sig['ci_low']:+.2f}, {100 * sig['ci_high']:+.2f}]"
    head = (f"On the test split's {test_errors} errors, {method_label(final)} reaches an "
            f"AUPR-Error of {percent(ours)}% against {percent(theirs)}% for the best baseline, "
            f"{method_label(best)} ({interval} points).")
    if sig["ci_low"] > 0:
        tail = "The gain is significant at the 95% level."
    elif sig["ci_high"] < 0:
        tail = "ConfidNet is significantly worse here."
    else:
        tail = ("The interval contains zero: this run does not show a difference between them; "
                "with this few errors, neither a win nor a loss is supported.")
    return f"{head} {tail}"


def save_figures(folder: Path, scores: Mapping[str, Mapping[str, np.ndarray]],
                 correct: np.ndarray, tcp: np.ndarray) -> list[tuple[str, str]]:
    """Risk-coverage curves (paper Fig. 3) and MCP / TCP / ConfidNet histograms of correct
    and wrong predictions (paper Fig. 1). Returns (file name, caption) pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.metrics import risk_coverage_curve

    folder.mkdir(parents=True, exist_ok=True)
    figures = []

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for method in ordered_methods([m for m in scores if m in PAPER_METHODS]):
        curve = risk_coverage_curve(scores[method]["test"], correct)
        style = ":" if method in ORACLES else "-"
        ax.step(curve.coverage * 100, curve.risk * 100, where="post", linestyle=style,
                label=method_label(method))
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
              ("ConfidNet, fine-tuned", scores["confidnet_finetuned"]["test"])]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    bins = np.linspace(0, 1, 41)
    for ax, (title, values) in zip(axes, panels, strict=True):
        ax.hist(values[correct == 1], bins=bins, density=True, alpha=0.6, color="tab:green",
                label=f"correct ({int(correct.sum())})")
        ax.hist(values[correct == 0], bins=bins, density=True, alpha=0.6, color="tab:red",
                label=f"wrong ({int((1 - correct).sum())})")
        ax.set_title(title)
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
