"""``pipeline.table1``: the paper's Table 1 with our numbers beside it, from DVC experiments."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest
from conftest import queue_status, run, run_queue, table_row, toy_dvc_project

import pipeline.aggregate
from pipeline import table1
from pipeline.aggregate import ExperimentResult, aggregate, parse_exp_show
from pipeline.table1 import (
    build_blocks,
    load_paper_table1,
    render,
    setting_order,
    table_cell,
    to_json,
)

METHODS = ("mcp", "mc_dropout", "trustscore", "confidnet", "confidnet_finetuned", "tcp_oracle")
METRICS = ("fpr_at_95tpr", "aupr_error", "aupr_success", "auroc")
PAPER_ORDER = ["mnist_mlp", "mnist_smallconv", "svhn_smallconv", "cifar10_vgg16",
               "cifar100_vgg16", "camvid_segnet"]


def _paper_row(label: str, base: float) -> dict[str, Any]:
    row: dict[str, Any] = {"label": label}
    for i, method in enumerate(("mcp", "mc_dropout", "trustscore", "confidnet")):
        row[method] = {metric: base + i + j / 10 for j, metric in enumerate(METRICS)}
    return row


# A small stand-in for pipeline/paper_results.yaml: values that tell rows and columns apart
# (MNIST MLP, ConfidNet, AUPR-Error = 10 + 3 + 0.1 = 13.1).
PAPER = {"mnist_mlp": _paper_row("MNIST MLP", 10.0),
         "svhn_smallconv": _paper_row("SVHN SmallConvNet", 50.0)}
PAPER["svhn_smallconv"]["trustscore"]["fpr_at_95tpr"] = None  # like CamVid's


def _result(name: str, seed: int, setting: str | None, *, loss: str = "mse",
            value: float = 0.5, accuracy: float = 0.98, errors: int = 20) -> ExperimentResult:
    params: dict[str, Any] = {"seed": seed, "loss": loss, "confidnet": {"epochs": 5}}
    if setting is not None:
        params["setting"] = setting
    methods = {m: {**{k: value for k in METRICS}, "accuracy": accuracy} for m in METHODS}
    return ExperimentResult(name, params, {"methods": methods, "errors": errors, "size": 1000})


def _blocks(results: list[ExperimentResult],
            paper: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return build_blocks(aggregate(results), PAPER if paper is None else paper)


def _row(text: str, title_part: str, label: str) -> list[str]:
    """The cells of the row ``label`` in the block whose title contains ``title_part``."""
    section = next(s for s in text.split("\n## ") if title_part in s.splitlines()[0])
    return table_row(section, label)


# --- cells ------------------------------------------------------------------------------------


def test_cell_one_seed_is_the_mean_beside_the_paper() -> None:
    stats = {"mean": 0.57123, "std": math.nan, "n": 1}
    assert table_cell(stats, 57.37, run=True, seeds=1) == "57.12 (57.37)"


def test_cell_several_seeds_is_mean_and_sample_std() -> None:
    stats = {"mean": 0.5712, "std": 0.0040, "n": 3}
    assert table_cell(stats, 57.37, run=True, seeds=3) == "57.12 ± 0.40 (57.37)"


def test_cell_nan_missing_and_partial_values() -> None:
    assert table_cell({"mean": math.nan, "std": math.nan, "n": 0}, 5.0, run=True,
                      seeds=3) == "n/a (5.00)"
    assert table_cell(None, None, run=True, seeds=3) == "n/a (—)"
    # Undefined on one of three seeds: the cell says on how many it rests.
    assert table_cell({"mean": 0.5, "std": 0.1, "n": 2}, None, run=True,
                      seeds=3) == "50.00 ± 10.00 [2/3 seeds] (—)"
    assert table_cell(None, 3.33, run=False, seeds=0) == "not run (3.33)"


# --- blocks and their order -------------------------------------------------------------------


def test_real_paper_table_is_in_the_papers_order() -> None:
    paper = load_paper_table1()
    assert list(paper) == PAPER_ORDER
    assert paper["mnist_mlp"]["confidnet"]["aupr_error"] == 57.37
    assert paper["camvid_segnet"]["trustscore"]["fpr_at_95tpr"] is None


def test_settings_in_paper_order_then_default_then_unknown() -> None:
    results = [_result("u", 0, None), _result("w", 0, "weird_setting"),
               _result("d", 0, "digits_mlp"), _result("c", 0, "cifar10_vgg16"),
               _result("m", 0, "mnist_mlp")]
    blocks = _blocks(results, load_paper_table1())
    assert [b["setting"] for b in blocks] == [*PAPER_ORDER, "digits_mlp", "weird_setting",
                                              "unknown"]
    assert setting_order("svhn_smallconv", PAPER_ORDER) < setting_order("digits_mlp",
                                                                        PAPER_ORDER)


def test_paper_settings_without_experiments_are_shown_as_not_run() -> None:
    blocks = _blocks([_result("a", 0, "mnist_mlp")])
    svhn = next(b for b in blocks if b["setting"] == "svhn_smallconv")
    assert not svhn["run"] and svhn["seeds"] == [] and svhn["accuracy"] is None
    text = render(blocks)
    assert "## SVHN SmallConvNet (`setting=svhn_smallconv`), not run" in text
    assert "No experiment with `setting=svhn_smallconv` yet" in text
    # The paper's numbers are still there, with "—" where the paper has none.
    assert _row(text, "SVHN", "MCP") == ["not run (50.00)", "not run (50.10)",
                                         "not run (50.20)", "not run (50.30)"]
    assert _row(text, "SVHN", "TrustScore")[0] == "not run (—)"


def test_paper_value_beside_ours_and_confidnet_row_is_after_finetuning() -> None:
    results = [_result("a", 0, "mnist_mlp", value=0.2), _result("b", 1, "mnist_mlp", value=0.4),
               _result("c", 2, "mnist_mlp", value=0.6)]
    results[0].test["methods"]["confidnet"]["aupr_error"] = 0.9  # phase 1 differs
    text = render(_blocks(results))
    # ConfidNet = confidnet_finetuned, beside the paper's ConfidNet (10 + 3, + 0.1 AUPR-Error)
    assert _row(text, "MNIST MLP", "ConfidNet") == [
        "40.00 ± 20.00 (13.00)", "40.00 ± 20.00 (13.10)", "40.00 ± 20.00 (13.20)",
        "40.00 ± 20.00 (13.30)"]
    assert _row(text, "MNIST MLP", "MCP")[1] == "40.00 ± 20.00 (10.10)"
    # Phase 1 is ours only: the paper does not report it.
    assert _row(text, "MNIST MLP", "ConfidNet, phase 1")[1] == "63.33 ± 25.17 (—)"  # 0.9, 0.4, 0.6
    assert "| TCP" not in text  # the oracle is not a row of the paper's Table 1


def test_digits_block_has_no_paper_values_and_says_so() -> None:
    text = render(_blocks([_result("d", 0, "digits_mlp", value=0.25)]))
    title = next(x for x in text.splitlines() if x.startswith("## Digits MLP"))
    assert "not in the paper" in title
    assert _row(text, "Digits MLP", "MCP") == ["25.00 (—)"] * 4
    assert _row(text, "Digits MLP", "ConfidNet") == ["25.00 (—)"] * 4


def test_groups_differing_in_other_params_are_separate_blocks() -> None:
    results = [_result("a", 0, "mnist_mlp", value=0.2), _result("b", 1, "mnist_mlp", value=0.4),
               _result("f", 0, "mnist_mlp", loss="focal", value=0.7),
               _result("s", 0, "svhn_smallconv", loss="focal")]
    blocks = [b for b in _blocks(results) if b["run"]]
    assert [(b["setting"], b["distinguishing"]) for b in blocks] == [
        ("mnist_mlp", {"loss": "mse"}),  # the most seeds first
        ("mnist_mlp", {"loss": "focal"}),
        ("svhn_smallconv", {}),  # one group: nothing to tell apart
    ]
    text = render(blocks)
    assert "## MNIST MLP (`setting=mnist_mlp`, `loss=mse`)" in text
    assert "## MNIST MLP (`setting=mnist_mlp`, `loss=focal`)" in text
    assert "## SVHN SmallConvNet (`setting=svhn_smallconv`)\n" in text
    assert "confidnet.epochs" not in text  # the same everywhere
    assert _row(text, "loss=focal", "MCP")[1] == "70.00 (10.10)"
    assert _row(text, "loss=mse", "MCP")[1] == "30.00 ± 14.14 (10.10)"


def test_block_states_the_classifier_it_rests_on() -> None:
    results = [_result(name, seed, "mnist_mlp", accuracy=acc, errors=err)
               for name, seed, acc, err in (("exp-b", 1, 0.981, 19), ("exp-a", 0, 0.980, 20),
                                            ("exp-c", 2, 0.982, 18))]
    text = render(_blocks(results))
    assert ("Classifier test accuracy 98.10 ± 0.10% over 3 seeds (0, 1, 2); test errors per "
            "seed: 20, 19, 18 of 1000 test samples; experiments: exp-a, exp-b, exp-c."
            in text)
    one = render(_blocks([_result("solo", 4, "mnist_mlp")]))
    assert "Classifier test accuracy 98.00% over 1 seed (4);" in one
    assert "more than once" not in text + one


def test_a_segmentation_block_states_pixels_and_miou() -> None:
    results = []
    for name, seed, miou in (("seg-a", 0, 0.60), ("seg-b", 1, 0.62)):
        result = _result(name, seed, "camvid_segnet", accuracy=0.88, errors=4000)
        result.test["segmentation"] = {"miou": miou, "pixel_accuracy": 0.88}
        result.test["size"] = 33000
        results.append(result)
    blocks = _blocks(results, {**PAPER, "camvid_segnet": _paper_row("CamVid SegNet", 60.0)})
    text = render(blocks)
    assert ("Segmentation test pixel accuracy 88.00 ± 0.00% over 2 seeds (0, 1); "
            "misclassified test pixels per seed: 4000, 4000 of 33000 labelled test pixels; "
            "experiments: seg-a, seg-b. mIoU 61.00 ± 1.41%;") in text
    assert _row(text, "CamVid SegNet", "ConfidNet")[1] == "50.00 ± 0.00 (63.10)"
    camvid = next(b for b in to_json(blocks)["blocks"] if b["setting"] == "camvid_segnet")
    assert camvid["miou"]["mean"] == pytest.approx(0.61)
    mnist = next(b for b in to_json(blocks)["blocks"] if b["setting"] == "mnist_mlp")
    assert "miou" not in mnist


def test_block_flags_a_seed_run_twice() -> None:
    text = render(_blocks([_result("a", 0, "mnist_mlp"), _result("b", 1, "mnist_mlp"),
                           _result("b2", 1, "mnist_mlp")]))
    assert "over 3 seeds (0, 1, 1)" in text
    assert "Seed 1 ran more than once" in text


def test_header_explains_units_conventions_and_rebuild() -> None:
    text = render(_blocks([_result("a", 0, "mnist_mlp"), _result("b", 1, "mnist_mlp")]))
    head = text.split("\n## ")[0]
    for needle in ("percent", "sample standard deviation", "(2 seeds here",
                   "after fine-tuning", "pipeline/metrics.py", "average_precision_score",
                   "FPR at 95% TPR", *table1.REBUILD_COMMANDS):
        assert needle in head, needle


def test_json_holds_the_same_numbers() -> None:
    results = [_result("a", 0, "mnist_mlp", value=0.2), _result("b", 1, "mnist_mlp", value=0.4),
               _result("d", 0, "digits_mlp", value=0.3)]
    data = to_json(_blocks(results))
    text = json.dumps(data, allow_nan=False)  # NaN (one seed's std) became null
    data = json.loads(text)
    assert [c["metric"] for c in data["columns"]] == list(METRICS)
    assert [r["method"] for r in data["rows"]] == ["mcp", "mc_dropout", "trustscore",
                                                    "confidnet_finetuned", "confidnet"]
    by_setting = {b["setting"]: b for b in data["blocks"]}
    mnist = by_setting["mnist_mlp"]
    assert mnist["seeds"] == [0, 1] and mnist["experiments"] == ["a", "b"]
    assert mnist["params"]["setting"] == "mnist_mlp" and "seed" not in mnist["params"]
    assert mnist["accuracy"] == {"mean": pytest.approx(0.98), "std": 0.0, "n": 2}
    cell = mnist["methods"]["confidnet_finetuned"]["aupr_error"]
    assert cell["ours"] == {"mean": pytest.approx(0.3), "std": pytest.approx(0.1414213),
                            "n": 2}
    assert cell["paper"] == pytest.approx(13.1)
    assert mnist["methods"]["confidnet"]["aupr_error"]["paper"] is None
    digits = by_setting["digits_mlp"]
    assert not digits["in_paper"]
    assert digits["methods"]["mcp"]["auroc"]["ours"]["std"] is None
    assert digits["methods"]["mcp"]["auroc"]["paper"] is None
    svhn = by_setting["svhn_smallconv"]
    assert not svhn["run"] and svhn["methods"]["mcp"]["auroc"]["ours"] is None
    assert svhn["methods"]["mcp"]["auroc"]["paper"] == pytest.approx(50.3)


# --- from `dvc exp show --json` to the files ------------------------------------------------


def _exp_show(runs: list[tuple[str, dict[str, Any], float]]) -> list[dict[str, Any]]:
    """Synthetic `dvc exp show --json`: one baseline commit without metrics, and one
    experiment per (name, params, AUPR-Error of every method)."""
    def data(params: dict[str, Any], value: float | None) -> dict[str, Any]:
        metrics = ({"data": {"methods": {m: {"aupr_error": value, "accuracy": 0.9}
                                         for m in METHODS}, "errors": 5, "size": 50}}
                   if value is not None else {"error": {"type": "FileNotFoundError"}})
        return {"params": {"params.yaml": {"data": params}},
                "metrics": {"metrics/evaluate.json": metrics}}

    return [{"rev": "abc", "name": "main", "data": data({"setting": "digits_mlp", "seed": 0},
                                                        None),
             "experiments": [{"revs": [{"rev": f"e{i}", "name": name, "data": data(p, v)}]}
                             for i, (name, p, v) in enumerate(runs)]}]


def test_main_writes_markdown_and_json_from_exp_show(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    shown = _exp_show([("x0", {"setting": "svhn_smallconv", "seed": 0}, 0.40),
                       ("x1", {"setting": "svhn_smallconv", "seed": 1}, 0.50)])
    assert [r.name for r in parse_exp_show(shown)] == ["x0", "x1"]
    calls: list[bool] = []

    def fake_exp_show(all_commits: bool = False) -> list[dict[str, Any]]:
        calls.append(all_commits)
        return shown

    monkeypatch.setattr(pipeline.aggregate, "exp_show", fake_exp_show)
    out = tmp_path / "reports" / "table1.md"
    table1.main(["--out", str(out), "--all-commits"])
    assert calls == [True]
    text = out.read_text()
    # 0.40 and 0.50: mean 45.00, sample std 7.07; the real paper's SVHN MCP AUPR-Error 48.18.
    assert _row(text, "SVHN", "MCP")[1] == "45.00 ± 7.07 (48.18)"
    assert "## MNIST MLP (`setting=mnist_mlp`), not run" in text
    data = json.loads(out.with_suffix(".json").read_text())
    assert [b["setting"] for b in data["blocks"]] == PAPER_ORDER


def test_main_without_experiments_says_to_run_them(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    monkeypatch.setattr(pipeline.aggregate, "exp_show",
                        lambda all_commits=False: _exp_show([]))
    with pytest.raises(SystemExit, match="run the experiments first") as raised:
        table1.main(["--out", str(tmp_path / "table1.md")])
    assert table1.REBUILD_COMMANDS[0] in str(raised.value)
    assert not (tmp_path / "table1.md").exists()


# --- end to end, with real dvc ----------------------------------------------------------------

# The toy pipeline's metrics: a base per setting, an offset per method and per metric, and
# a step per seed, so every mean and std in the table can be computed here.
BASES = {"mnist_mlp": 0.10, "mnist_smallconv": 0.20, "svhn_smallconv": 0.30,
         "cifar10_vgg16": 0.40, "cifar100_vgg16": 0.50}
STAGE = f"""\
import json, yaml
p = yaml.safe_load(open("params.yaml"))
base = {BASES!r}[p["setting"]]
methods = {list(METHODS)!r}
metrics = {list(METRICS)!r}
out = {{m: {{k: base + 0.01 * i + 0.001 * j + 0.02 * p["seed"] for j, k in enumerate(metrics)}}
       for i, m in enumerate(methods)}}
for m in out:
    out[m]["accuracy"] = 0.9 + 0.01 * p["seed"]
json.dump({{"methods": out, "errors": 100 - p["seed"], "size": 1000}},
          open("metrics/evaluate.json", "w"))
"""


QUEUE_TIMEOUT_S = 300


def _toy_value(setting: str, method: str, metric: str, seed: int) -> float:
    return (BASES[setting] + 0.01 * METHODS.index(method) + 0.001 * METRICS.index(metric)
            + 0.02 * seed)


@pytest.mark.slow
def test_rebuild_commands_on_a_toy_dvc_project(tmp_path: Path) -> None:
    """The header's rebuild commands, run as written on a toy project whose one stage
    writes metrics/evaluate.json from params.yaml; the table shows what it wrote."""
    toy_dvc_project(tmp_path, "setting: digits_mlp\nseed: 0\n", STAGE, ["setting", "seed"])

    queue, start, build = table1.REBUILD_COMMANDS
    run(tmp_path, ["bash", "-c", queue])
    names = set(queue_status(tmp_path)[0])
    assert len(names) == len(BASES) * 3
    statuses = run_queue(tmp_path, names, 1, QUEUE_TIMEOUT_S, command=["bash", "-c", start])
    assert all(statuses[n] == "Success" for n in names), statuses
    printed = run(tmp_path, ["bash", "-c", build]).stdout
    assert "5 block(s) from 15 experiment(s); 1 paper setting(s) not run" in printed

    text = (tmp_path / "reports" / "table1.md").read_text()
    paper = load_paper_table1()
    for setting in BASES:
        for method, label, paper_method in table1.ROWS:
            for metric, cell in zip(METRICS, _row(text, f"setting={setting}`", label),
                                    strict=True):
                values = [_toy_value(setting, method, metric, s) for s in (0, 1, 2)]
                theirs = (f"{paper[setting][paper_method][metric]:.2f}" if paper_method
                          else "—")
                assert cell == (f"{100 * statistics.mean(values):.2f} ± "
                                f"{100 * statistics.stdev(values):.2f} ({theirs})")
    # e.g. MNIST MLP, ConfidNet (fine-tuned, method 4) AUPR-Error: 0.141, 0.161, 0.181.
    assert _row(text, "setting=mnist_mlp`", "ConfidNet")[1] == "16.10 ± 2.00 (57.37)"
    assert ("Classifier test accuracy 91.00 ± 1.00% over 3 seeds (0, 1, 2); test errors per "
            "seed: 100, 99, 98 of 1000 test samples" in text)
    assert "## CamVid SegNet (`setting=camvid_segnet`), not run" in text
    assert "Digits MLP" not in text  # the workspace never ran

    data = json.loads((tmp_path / "reports" / "table1.json").read_text())
    block = next(b for b in data["blocks"] if b["setting"] == "cifar100_vgg16")
    assert block["seeds"] == [0, 1, 2] and len(block["experiments"]) == 3
    ours = block["methods"]["trustscore"]["auroc"]["ours"]
    assert ours["mean"] == pytest.approx(0.50 + 0.02 + 0.003 + 0.02)
    assert ours["std"] == pytest.approx(0.02) and ours["n"] == 3
