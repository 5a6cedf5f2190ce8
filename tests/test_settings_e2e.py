"""Every paper setting end to end on CPU: the documented Table 1 command (one sweep of queued
DVC experiments) with the smoke budget, on small files in each dataset's real format served
by a local HTTP server, then `python -m pipeline.table1`. This runs, for each setting, the
real download (torchvision's downloader, checksums), loader, architecture, both ConfidNet
phases, every baseline and the evaluation. The sweep names four settings; the fifth,
CIFAR-100, is queued on its own with single knobs overridden on top of its preset (its
schedule and augmentation stay, two epochs, focal loss, TCP-r, features without dropout),
so that one experiment covers both (each costs a minute of CPU)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import (
    UNTRACKED,
    experiment_output,
    experiments_shown,
    make_project,
    run,
    run_queue,
)
from fake_datasets import NAMES, no_proxy_env, serve_folder, write_dataset

from pipeline.settings import compose

pytestmark = pytest.mark.slow

PAPER_SETTINGS = {"mnist_mlp": ("mnist", "mlp"), "mnist_smallconv": ("mnist", "smallconv_mnist"),
                  "svhn_smallconv": ("svhn", "smallconv_svhn"),
                  "cifar10_vgg16": ("cifar10", "vgg16"), "cifar100_vgg16": ("cifar100", "vgg16")}
OVERRIDDEN = "cifar100_vgg16"
# as the README's Table 1 command, without the overridden setting
SWEEP = "setting=" + ",".join(s for s in PAPER_SETTINGS if s != OVERRIDDEN)
OVERRIDES = [f"setting={OVERRIDDEN}", "budget=smoke", "classifier.epochs=2", "loss=focal",
             "criterion=tcp_r", "confidnet.features=no_dropout"]
# Fewer than fake_datasets' 300 CIFAR-100 training images (which test_image_datasets needs,
# to find every class in training): its VGG16 trains two epochs here, the queue's longest.
TRAIN_IMAGES = {"cifar100": 150}
TIMEOUT_S = 3600  # a stall guard: other pytest-xdist workers share the cores with this queue


def point_conf_at_mirror(project: Path, url: str, checksums: dict[str, str]) -> None:
    """Set data.mirror and data.checksums in the project's conf/config.yaml, as a team with
    an internal mirror of re-packed archives would, and commit."""
    config = project / "conf" / "config.yaml"
    text = config.read_text()
    assert "  mirror: ''" in text and "  checksums: {}" in text
    text = text.replace("  mirror: ''", f"  mirror: '{url}'")
    text = text.replace("  checksums: {}", f"  checksums: {json.dumps(checksums)}")
    config.write_text(text)
    (project / "params.yaml").write_text(compose(root=project))
    run(project, ["git", "commit", "-qam", "use the local mirror"])


def queue(project: Path, *overrides: str) -> list[str]:
    args = ["dvc", "exp", "run", "--queue"]
    for override in overrides:
        args += ["-S", override]
    out = run(project, args).stdout
    return re.findall(r"Queued experiment '([\w.-]+)'", out)


@pytest.fixture(scope="module")
def table1_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("settings")
    mirror = root / "mirror"
    checksums: dict[str, str] = {}
    for name in NAMES:
        checksums.update(write_dataset(name, mirror, n_train=TRAIN_IMAGES.get(name)))
    project = make_project(root / "project")
    with serve_folder(mirror) as url:
        point_conf_at_mirror(project, url, checksums)
        # the longest (VGG16 on CIFAR-100, two epochs) first: the queue runs in order, so it
        # runs beside the sweep instead of alone at the end
        [overridden] = queue(project, *OVERRIDES)
        swept = queue(project, SWEEP, "budget=smoke")
        assert len(swept) == len(PAPER_SETTINGS) - 1
        names = {*swept, overridden}
        started = time.monotonic()
        # two at a time: each stage is one single-threaded process (OMP_NUM_THREADS=1), and
        # two experiments fetching the same archive into the shared cache must not collide.
        # Untracked: queued experiments' runs are test_tracking_server's and
        # test_parallel_experiments' subject.
        statuses = run_queue(project, names, 2, TIMEOUT_S, env={**no_proxy_env(), **UNTRACKED})
        elapsed = time.monotonic() - started
    failed = {n: s for n, s in statuses.items() if s != "Success"}
    logs = {n: run(project, ["dvc", "queue", "logs", n], check=False).stdout for n in failed}
    assert not failed, "\n".join(f"--- {n} {s}\n{logs[n][-4000:]}" for n, s in failed.items())
    print(f"{len(names)} smoke experiments: {elapsed:.0f} s")
    shown = experiments_shown(project)
    return project, {"swept": swept, "overridden": overridden, "shown": shown}


def params_of(data: dict[str, Any]) -> dict[str, Any]:
    return data["params"]["params.yaml"]["data"]


def test_each_setting_ran_its_dataset_and_architecture(table1_project) -> None:
    project, runs = table1_project
    seen = {}
    for name in [*runs["swept"], runs["overridden"]]:
        data = runs["shown"][name]
        params = params_of(data)
        seen[params["setting"]] = (params["dataset"], params["classifier"]["model"])
        epochs = 2 if name == runs["overridden"] else 1
        assert params["budget"] == "smoke" and params["classifier"]["epochs"] == epochs
        evaluation = experiment_output(project, data, "metrics/evaluate.json")
        assert {"mcp", "mc_dropout", "trustscore", "confidnet", "confidnet_finetuned"} \
            <= set(evaluation["methods"])
        assert evaluation["size"] == (100 if params["dataset"] == "cifar100" else 20)
        classifier = experiment_output(project, data, "metrics/classifier.json")
        assert 1 <= classifier["best_epoch"] <= epochs
    assert seen == PAPER_SETTINGS
    # archives were fetched once into the shared cache of the project (DVC_ROOT), not into
    # the queue's throw-away copies
    cached = {p.parent.name for p in (project / ".downloads").glob("*/*") if p.is_file()}
    assert cached == set(NAMES)
    # CONFIDNET_TRACKING=off reached every stage of the queue: no store was made
    assert not (project / "mlflow.db").exists()


def test_single_knobs_override_the_preset(table1_project) -> None:
    project, runs = table1_project
    data = runs["shown"][runs["overridden"]]
    params = params_of(data)
    assert params["setting"] == OVERRIDDEN
    cfg = params["classifier"]
    assert cfg["epochs"] == 2  # the override
    assert (cfg["model"], cfg["lr"], cfg["milestones"]) == ("vgg16", 0.1, [90, 135])  # preset
    assert cfg["augmentation"] == {"hflip": True, "rotate_degrees": 0.0, "crop_padding": 4}
    assert (params["loss"], params["criterion"], params["confidnet"]["features"]) == (
        "focal", "tcp_r", "no_dropout")
    assert experiment_output(project, data, "metrics/evaluate.json")["methods"]["confidnet"]


def test_table1_aggregates_every_setting(table1_project) -> None:
    project, runs = table1_project
    run(project, ["python", "-m", "pipeline.table1"])
    text = (project / "reports" / "table1.md").read_text()
    blocks = json.loads((project / "reports" / "table1.json").read_text())
    blocks = blocks["blocks"] if isinstance(blocks, dict) else blocks
    by_setting: dict[str, list[dict[str, Any]]] = {}
    for block in blocks:
        by_setting.setdefault(block["setting"], []).append(block)
    for setting in PAPER_SETTINGS:
        assert any(b.get("run", True) for b in by_setting[setting]), setting
    # the swept experiment's AUPR-Error of MCP is the number in its block
    name = runs["swept"][0]
    data = runs["shown"][name]
    setting = params_of(data)["setting"]
    evaluation = experiment_output(project, data, "metrics/evaluate.json")
    ours = evaluation["methods"]["mcp"]["aupr_error"]
    block = next(b for b in by_setting[setting] if name in b["experiments"])
    assert block["methods"]["mcp"]["aupr_error"]["ours"]["mean"] == pytest.approx(ours)
    paper = yaml.safe_load((project / "pipeline" / "paper_results.yaml").read_text())
    expected = paper["table1"][setting]["mcp"]["aupr_error"]
    assert block["methods"]["mcp"]["aupr_error"]["paper"] == expected
    assert f"({expected:.2f})" in text
