"""``pipeline.aggregate``: mean and std across seeds of DVC experiments."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import run, toy_dvc_project, toy_dvc_yaml

from pipeline.aggregate import ExperimentResult, aggregate, parse_exp_show, render


def _result(name: str, seed: int, loss: str, aupr_error: float) -> ExperimentResult:
    return ExperimentResult(name, {"seed": seed, "loss": loss, "confidnet": {"epochs": 5}},
                            {"methods": {"mcp": {"aupr_error": aupr_error, "auroc": 0.9}},
                             "errors": 10 + seed, "size": 100})


def test_groups_by_everything_but_seed_with_sample_std() -> None:
    groups = aggregate([_result("a", 0, "mse", 0.2), _result("b", 1, "mse", 0.4),
                        _result("c", 2, "mse", 0.6), _result("d", 0, "focal", 0.5)])
    assert len(groups) == 2
    mse = next(g for g in groups if g["params"]["loss"] == "mse")
    assert mse["seeds"] == [0, 1, 2]
    assert mse["test_errors"] == [10, 11, 12]
    stats = mse["methods"]["mcp"]["aupr_error"]
    assert stats["mean"] == pytest.approx(0.4)
    assert stats["std"] == pytest.approx(0.2)  # sample std of 0.2, 0.4, 0.6
    assert stats["n"] == 3
    focal = next(g for g in groups if g["params"]["loss"] == "focal")
    assert math.isnan(focal["methods"]["mcp"]["aupr_error"]["std"])  # one seed


def test_nan_values_are_left_out_of_their_metric() -> None:
    groups = aggregate([_result("a", 0, "mse", float("nan")), _result("b", 1, "mse", 0.4)])
    stats = groups[0]["methods"]["mcp"]["aupr_error"]
    assert stats == {"mean": pytest.approx(0.4), "std": stats["std"], "n": 1}
    assert math.isnan(stats["std"])


def test_render_names_the_differing_params_and_shows_mean_and_std() -> None:
    text = render(aggregate([_result("a", 0, "mse", 0.2), _result("b", 1, "mse", 0.4),
                             _result("c", 0, "focal", 0.5)]))
    assert "`loss=mse`" in text and "`loss=focal`" in text
    assert "30.00 ± 14.14" in text  # mean 0.3, sample std 0.1414 of 0.2 and 0.4
    assert "confidnet.epochs" not in text  # the same in every group


STAGE = """\
import json, yaml
p = yaml.safe_load(open("params.yaml"))
value = 0.1 * p["seed"] + (0.5 if p["loss"] == "focal" else 0.0)
json.dump({"methods": {"mcp": {"aupr_error": value}}, "errors": 7, "size": 50},
          open("metrics/evaluate.json", "w"))
"""



@pytest.mark.slow
def test_aggregates_real_dvc_experiments(tmp_path: Path) -> None:
    toy_dvc_project(tmp_path, "seed: 0\nloss: mse\n", STAGE, ["seed", "loss"])
    for seed in (0, 1, 2):
        for loss in ("mse", "focal"):
            run(tmp_path, ["dvc", "exp", "run", "-S", f"seed={seed}", "-S", f"loss={loss}"])
    run(tmp_path, ["python", "-m", "pipeline.aggregate", "--out", "reports/seeds.md"])
    groups = json.loads((tmp_path / "reports" / "seeds.json").read_text())
    by_loss = {g["params"]["loss"]: g for g in groups}
    assert set(by_loss) == {"mse", "focal"}
    for loss, offset in (("mse", 0.0), ("focal", 0.5)):
        group = by_loss[loss]
        assert sorted(group["seeds"]) == [0, 1, 2]
        stats = group["methods"]["mcp"]["aupr_error"]
        assert stats["mean"] == pytest.approx(0.1 + offset)
        assert stats["std"] == pytest.approx(0.1)
    assert "± 10.00" in (tmp_path / "reports" / "seeds.md").read_text()


@pytest.mark.slow
def test_aggregates_experiments_of_both_metrics_layouts(tmp_path: Path) -> None:
    """Experiments made while metrics/evaluate.json was DVC's metrics file (`dvc exp show`
    carries it) and after it became a plain output beside metrics/headline.json (read from
    the experiment's outputs in DVC's cache) aggregate together."""
    toy_dvc_project(tmp_path, "seed: 0\nloss: mse\n", STAGE, ["seed", "loss"])
    for seed in (0, 1):
        run(tmp_path, ["dvc", "exp", "run", "-S", f"seed={seed}"])
    run(tmp_path, ["git", "checkout", "--", "params.yaml"])
    (tmp_path / "dvc.yaml").write_text(toy_dvc_yaml(["seed", "loss"], headline=True))
    run(tmp_path, ["git", "commit", "-qam", "metrics/headline.json is the metrics file"])
    for seed, loss in ((2, "mse"), (0, "focal"), (1, "focal")):
        run(tmp_path, ["dvc", "exp", "run", "-S", f"seed={seed}", "-S", f"loss={loss}"])
    shown = json.loads(run(tmp_path, ["dvc", "exp", "show", "--json", "-A"]).stdout)
    new = [rev["data"]["metrics"] for entry in shown for e in entry.get("experiments") or []
           for rev in e["revs"] if "metrics/headline.json" in rev["data"]["metrics"]]
    assert len(new) == 3 and all("metrics/evaluate.json" not in m for m in new)

    run(tmp_path, ["python", "-m", "pipeline.aggregate", "--all-commits"])
    groups = {g["params"]["loss"]: g for g in
              json.loads((tmp_path / "reports" / "seeds.json").read_text())}
    assert sorted(groups["mse"]["seeds"]) == [0, 1, 2]
    assert sorted(groups["focal"]["seeds"]) == [0, 1]
    assert groups["mse"]["methods"]["mcp"]["aupr_error"]["mean"] == pytest.approx(0.1)
    assert groups["focal"]["methods"]["mcp"]["aupr_error"]["mean"] == pytest.approx(0.55)


def test_parse_skips_workspace_duplicate_and_revisions_without_metrics() -> None:
    def data(seed: int, metrics: dict | None) -> dict:
        return {"params": {"params.yaml": {"data": {"seed": seed, "loss": "mse"}}},
                "metrics": {"metrics/evaluate.json": {"data": metrics} if metrics
                            else {"error": {"type": "FileNotFoundError"}}}}

    m = {"methods": {"mcp": {"aupr_error": 0.3}}, "errors": 3}
    shown = [
        {"rev": "workspace", "name": None, "data": data(2, m), "experiments": None},
        {"rev": "abc", "name": "main", "data": data(0, None), "experiments": [
            {"revs": [{"rev": "e1", "name": "exp-one", "data": data(2, m)}]},
            {"revs": [{"rev": "e2", "name": "exp-two", "data": data(1, m)}]},
        ]},
    ]
    names = [r.name for r in parse_exp_show(shown)]
    assert names == ["exp-one", "exp-two"]
