"""A measured row (``pipeline.measured``): real DVC experiments over seeds, their scores read
back from DVC's cache, a paired bootstrap pooled over the seeds, and Table 1 rebuilt from
the committed row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import git_head, run, table_row, toy_dvc_project

from pipeline.measured import load_measured, render
from pipeline.metrics import failure_metrics
from pipeline.table1 import build_blocks, load_paper_table1

# The evaluate stage of a toy setting: per seed, a test set, two baselines' scores and
# ConfidNet's (before and after fine-tuning), written where the real stages write them,
# and metrics/evaluate.json computed from them by the project's own metrics.
STAGE = """
import json, os
import numpy as np
import yaml
from pipeline.metrics import failure_metrics

params = yaml.safe_load(open("params.yaml"))
rng = np.random.default_rng(params["seed"])
n = 400
labels = rng.integers(0, 3, n)
logits = rng.normal(size=(n, 3))
logits[np.arange(n), labels] += np.where(rng.random(n) < 0.8, 4.0, -4.0)
correct = (logits.argmax(1) == labels).astype(int)
scores = {"mcp": rng.normal(size=n) + correct, "trustscore": rng.normal(size=n) + correct,
          "confidnet": rng.normal(size=n) + 2 * correct,
          "confidnet_finetuned": rng.normal(size=n) + 2 * correct}
for folder in ("features", "scores/baselines"):
    os.makedirs(folder, exist_ok=True)
np.savez("features/test.npz", features=np.zeros((n, 2)), logits=logits, labels=labels)
for method, s in scores.items():
    folder = "scores" if method.startswith("confidnet") else "scores/baselines"
    path = f"{folder}/{method}.npz"
    np.savez(path, val=s[:10], test=s)
methods = {m: {**failure_metrics(s, correct), "accuracy": float(correct.mean())}
           for m, s in scores.items()}
json.dump({"methods": methods, "errors": int(n - correct.sum()), "size": n},
          open("metrics/evaluate.json", "w"))
"""
PARAMS = ("setting: toy\nbudget: full\nseed: 0\nevaluate:\n  bootstrap_resamples: 200\n"
          "tracking:\n  experiment: none\n")
OUTS = ["features", "scores"]


@pytest.mark.slow
def test_measured_row_from_real_dvc_experiments(tmp_path: Path) -> None:
    toy_dvc_project(tmp_path, PARAMS, STAGE, ["seed"], outs=OUTS)
    (tmp_path / ".gitignore").write_text("/features\n/scores\n")
    run(tmp_path, ["git", "add", ".gitignore"])
    run(tmp_path, ["git", "commit", "-qm", "ignore outputs"])
    for seed in (0, 1, 2):
        run(tmp_path, ["dvc", "exp", "run", "-S", f"seed={seed}"])
    # a run of another setting is left out of the row
    run(tmp_path, ["dvc", "exp", "run", "-S", "seed=3", "-S", "setting=other"])
    done = run(tmp_path, ["python", "-m", "pipeline.measured", "toy"])
    assert "3 seeds" in done.stdout
    row = json.loads((tmp_path / "reports/measured/toy.json").read_text())
    assert row["seeds"] == [0, 1, 2]
    assert row["git_commit"] == git_head(tmp_path)
    assert row["params"]["setting"] == "toy" and "seed" not in row["params"]

    # the per-seed values are the stage's, recomputed here from the same generator
    per_seed = {"mcp": [], "confidnet_finetuned": [], "diff": []}
    for seed in (0, 1, 2):
        rng = np.random.default_rng(seed)
        n = 400
        labels = rng.integers(0, 3, n)
        logits = rng.normal(size=(n, 3))
        logits[np.arange(n), labels] += np.where(rng.random(n) < 0.8, 4.0, -4.0)
        correct = (logits.argmax(1) == labels).astype(int)
        mcp = rng.normal(size=n) + correct
        rng.normal(size=n)  # trustscore
        rng.normal(size=n)  # confidnet
        finetuned = rng.normal(size=n) + 2 * correct
        a, b = failure_metrics(finetuned, correct), failure_metrics(mcp, correct)
        per_seed["mcp"].append(b["aupr_error"])
        per_seed["confidnet_finetuned"].append(a["aupr_error"])
        per_seed["diff"].append(a["aupr_error"] - b["aupr_error"])
    stats = row["methods"]["mcp"]["aupr_error"]
    assert stats["per_seed"] == pytest.approx(per_seed["mcp"])
    assert stats["mean"] == pytest.approx(np.mean(per_seed["mcp"]))
    assert stats["std"] == pytest.approx(np.std(per_seed["mcp"], ddof=1))
    paired = row["paired"]["confidnet_finetuned-mcp"]["aupr_error"]
    assert paired["per_seed"] == pytest.approx(per_seed["diff"])
    assert paired["mean_diff"] == pytest.approx(np.mean(per_seed["diff"]))
    assert paired["ci"][0] > 0  # a clearly better score is significantly better
    assert set(row["paired"]) == {f"{c}-{b}" for c in ("confidnet_finetuned", "confidnet")
                                  for b in ("mcp", "trustscore")}

    md = (tmp_path / "reports/measured/toy.md").read_text()
    assert table_row(md, "ConfidNet") and "better" in md
    assert f"{100 * np.mean(per_seed['confidnet_finetuned']):.2f} ±" in md

    # A seed run later pools with the committed ones, read from the committed predictions:
    # the first three experiments are gone from this repository by then.
    assert sorted(p.name for p in (tmp_path / "reports/measured/toy").iterdir()) == sorted(
        f"{name}.npz" for name in row["experiments"])
    run(tmp_path, ["dvc", "exp", "remove", *row["experiments"]])
    run(tmp_path, ["dvc", "exp", "run", "-S", "seed=4", "-S", "setting=toy"])
    done = run(tmp_path, ["python", "-m", "pipeline.measured", "toy"])
    assert "4 seeds (1 from experiments, 3 from the committed row)" in done.stdout
    pooled = json.loads((tmp_path / "reports/measured/toy.json").read_text())
    assert pooled["seeds"] == [0, 1, 2, 4]
    assert pooled["methods"]["mcp"]["aupr_error"]["per_seed"][:3] == pytest.approx(
        per_seed["mcp"])
    four = pooled["paired"]["confidnet_finetuned-mcp"]["aupr_error"]
    assert four["per_seed"][:3] == pytest.approx(per_seed["diff"])
    assert four["mean_diff"] == pytest.approx(np.mean(four["per_seed"]))

    # Table 1 from the committed rows, without any experiment
    run(tmp_path, ["python", "-m", "pipeline.table1", "--measured", "reports/measured",
                   "--out", "reports/table1.md"])
    table = json.loads((tmp_path / "reports/table1.json").read_text())
    ran = [b for b in table["blocks"] if b["run"]]
    assert [b["setting"] for b in ran] == ["toy"] and ran[0]["seeds"] == [0, 1, 2, 4]


def _row() -> dict:
    stats = {"mean": 0.5, "std": 0.01, "n": 2, "per_seed": [0.49, 0.51]}
    methods = {m: {k: dict(stats) for k in ("fpr_at_95tpr", "aupr_error", "aupr_success",
                                            "auroc", "accuracy")}
               for m in ("mcp", "mc_dropout", "trustscore", "confidnet", "confidnet_finetuned")}
    return {"setting": "mnist_mlp", "seeds": [0, 1], "experiments": ["a", "b"],
            "git_commit": "0123456789abcdef", "params": {"setting": "mnist_mlp"},
            "test_errors": [180, 190], "test_sizes": [10000, 10000], "methods": methods,
            "paired": {"confidnet_finetuned-mcp": {"aupr_error": {
                "mean_diff": 0.09, "ci": [0.04, 0.14], "per_seed": [0.08, 0.10]}}},
            "bootstrap": {"resamples": 1000},
            "wall_time_s": {"a": {"train_classifier": 600.0, "train_confidnet": 2400.0},
                            "b": {}}}


def test_render_puts_the_papers_value_beside_ours() -> None:
    paper = load_paper_table1()["mnist_mlp"]
    md = render(_row(), paper)
    assert f"50.00 ± 1.00 ({paper['confidnet']['aupr_error']:.2f})" in md
    assert f"50.00 ± 1.00 ({paper['mcp']['aupr_error']:.2f})" in md
    assert table_row(md, "ConfidNet, phase 1")[0] == "50.00 ± 1.00 (—)"  # not in the paper
    assert table_row(md, "ConfidNet − MCP") == [
        "aupr_error", "+9.00", "[+4.00, +14.00]", "+8.00, +10.00", "better"]
    assert table_row(md, "0")[:2] == ["a", "180"]
    assert table_row(md, "0")[-1] == "50 min (train_classifier, train_confidnet)"
    assert table_row(md, "1")[-1] == "n/a"


def test_table1_lays_out_committed_rows(tmp_path: Path) -> None:
    (tmp_path / "mnist_mlp.json").write_text(json.dumps(_row()))
    groups = load_measured(tmp_path)
    blocks = build_blocks(groups, load_paper_table1())
    block = next(b for b in blocks if b["setting"] == "mnist_mlp")
    assert block["run"] and block["seeds"] == [0, 1]
    assert block["methods"]["confidnet_finetuned"]["aupr_error"]["ours"]["mean"] == 0.5


REPO = Path(__file__).resolve().parent.parent
MEASURED_DIR = REPO / "reports" / "measured"


def test_committed_table1_is_built_from_the_committed_measured_rows(tmp_path: Path) -> None:
    """reports/table1.md and .json are what `python -m pipeline.table1 --measured
    reports/measured` writes from the committed rows: no number kept in step by hand."""
    out = tmp_path / "table1.md"
    from pipeline.table1 import main as table1_main

    table1_main(["--measured", str(MEASURED_DIR), "--out", str(out)])
    assert (REPO / "reports" / "table1.md").read_text() == out.read_text()
    assert (REPO / "reports" / "table1.json").read_text() == out.with_suffix(".json").read_text()


def test_committed_measured_markdown_and_readme_quote_the_json() -> None:
    """Each committed reports/measured/<setting>.md is the rendering of its .json, and the
    README's "What we found" quotes the summary of each between markers."""
    from pipeline.measured import summary

    readme = (REPO / "README.md").read_text()
    rows = sorted(MEASURED_DIR.glob("*.json"))
    assert rows, "no measured row committed"
    for path in rows:
        row = json.loads(path.read_text())
        paper = load_paper_table1().get(row["setting"])
        assert path.with_suffix(".md").read_text() == render(row, paper)
        start = f"<!-- measured:{row['setting']} -->\n"
        end = f"<!-- /measured:{row['setting']} -->"
        assert start in readme and end in readme, f"README lacks the {row['setting']} block"
        quoted = readme.split(start, 1)[1].split(end, 1)[0]
        assert quoted == summary(row, paper)
