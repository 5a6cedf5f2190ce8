"""Unit tests for ``pipeline.config``: the repository's params.yaml validates, and every
kind of bad value is reported with the key, the value and what is allowed."""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from pipeline.config import Params, ParamsError, load_config, load_params, validate

PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"
MISSING = object()  # marks a row that deletes the key instead of setting it


@pytest.fixture(scope="module")
def base_params() -> dict[str, Any]:
    return yaml.safe_load(PARAMS_FILE.read_text())


def with_value(params: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(params)
    *parents, leaf = path.split(".")
    node = out
    for key in parents:
        node = node[key]
    if value is MISSING:
        del node[leaf]
    else:
        node[leaf] = value
    return out


def test_repository_params_are_valid(base_params: dict[str, Any]) -> None:
    assert validate(base_params) is base_params
    assert load_params(PARAMS_FILE) == base_params


def test_schema_covers_every_key_of_params_yaml(base_params: dict[str, Any]) -> None:
    def leaves(node: dict[str, Any], prefix: str = "") -> set[str]:
        out: set[str] = set()
        for key, value in node.items():
            if isinstance(value, dict) and prefix + key != "data.checksums":
                out |= leaves(value, f"{prefix}{key}.")
            else:
                out.add(f"{prefix}{key}")
        return out

    def fields(model: type[BaseModel], prefix: str = "") -> set[str]:
        out: set[str] = set()
        for key, field in model.model_fields.items():
            kind = field.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                out |= fields(kind, f"{prefix}{key}.")
            else:
                out.add(f"{prefix}{key}")
        return out

    assert leaves(base_params) == fields(Params)


# (path, bad value, substrings the message must contain)
BAD_ROWS = [
    pytest.param("loss", "hinge", ["loss = 'hinge'", "valid values: bce, focal, mse, ranking"],
                 id="unknown-loss"),
    pytest.param("classifier.epochs", -5, ["classifier.epochs = -5", ">= 1"],
                 id="negative-epochs"),
    pytest.param("confidnet.epochs", 0, ["confidnet.epochs = 0", ">= 1"], id="zero-epochs"),
    pytest.param("finetune.epochs", -1, ["finetune.epochs = -1", ">= 0"],
                 id="negative-finetune-epochs"),
    pytest.param("classifier.batch_size", 0, ["classifier.batch_size = 0", ">= 1"],
                 id="zero-batch-size"),
    pytest.param("baselines.batch_size", 0, ["baselines.batch_size = 0", ">= 1"],
                 id="zero-mc-batch-size"),
    pytest.param("dataset", "imagenet", ["dataset = 'imagenet'",
                                         "valid values: camvid, cifar10, cifar100, digits, "
                                         "mnist, svhn"],
                 id="unknown-dataset"),
    pytest.param("criterion", "tcpr", ["criterion = 'tcpr'", "valid values: tcp, tcp_r"],
                 id="unknown-criterion"),
    pytest.param("classifier.model", "resnet", ["classifier.model = 'resnet'",
                                                "valid values: mlp, segnet, smallconv_mnist, "
                                                "smallconv_svhn, vgg16"], id="unknown-model"),
    pytest.param("device", "gpu", ["device = 'gpu'", "auto, cpu, cuda, cuda:N"],
                 id="bad-device"),
    pytest.param("device", "cuda:x", ["device = 'cuda:x'", "cuda:N"], id="bad-device-index"),
    pytest.param("device", "cuda:", ["device = 'cuda:'", "cuda:N"], id="bad-device-empty"),
    pytest.param("data.test_fraction", 1.5, ["data.test_fraction = 1.5", "<= 0.9"],
                 id="fraction-above-range"),
    pytest.param("data.val_fraction", 0.0, ["data.val_fraction = 0.0", "> 0.0"],
                 id="fraction-zero"),
    pytest.param("confidnet.focal_alpha", 1.2, ["confidnet.focal_alpha = 1.2", "<= 1.0"],
                 id="focal-alpha-above-one"),
    pytest.param("classifier.dropout", -0.1, ["classifier.dropout = -0.1", ">= 0.0"],
                 id="negative-dropout"),
    pytest.param("classifier.lr", 0, ["classifier.lr = 0", "> 0.0"], id="zero-lr"),
    pytest.param("classifier.hidden", "1000", ["classifier.hidden = '1000'",
                                               "must be an integer, got str"],
                 id="string-for-int"),
    pytest.param("classifier.epochs", 10.5, ["classifier.epochs = 10.5",
                                             "must be an integer, got float"],
                 id="float-for-int"),
    pytest.param("baselines.mc_samples", True, ["baselines.mc_samples = True",
                                                "not a boolean"], id="bool-for-int"),
    pytest.param("confidnet.lr", "1e-4", ["confidnet.lr = '1e-4'", "must be a number"],
                 id="string-for-float"),
    pytest.param("confidnet.focal_gamma", False, ["confidnet.focal_gamma = False",
                                                  "not a boolean"], id="bool-for-float"),
    pytest.param("seed", -1, ["seed = -1", ">= 0"], id="negative-seed"),
    pytest.param("evaluate.bootstrap_resamples", 10, ["evaluate.bootstrap_resamples = 10",
                                                      ">= 100"], id="too-few-resamples"),
    pytest.param("tracking.experiment", 3, ["tracking.experiment = 3", "must be a string"],
                 id="int-for-string"),
    pytest.param("losss", "mse", ["losss: unknown key", "did you mean 'loss'?"],
                 id="unknown-top-level-key"),
    pytest.param("classifier.epoch", 3, ["classifier.epoch: unknown key", "did you mean",
                                         "epochs"], id="unknown-nested-key"),
    pytest.param("classifier.lr", MISSING, ["classifier.lr: missing"], id="missing-key"),
    pytest.param("criterion", MISSING, ["criterion: missing"], id="missing-top-level-key"),
    pytest.param("classifier", 5, ["classifier", "must be a mapping", "5"],
                 id="section-not-a-mapping"),
    pytest.param("setting", "cifar10", ["setting = 'cifar10'", "valid values: camvid_segnet, "
                                        "cifar100_vgg16, cifar10_vgg16, digits_mlp, mnist_mlp"],
                 id="unknown-setting"),
    pytest.param("budget", "tiny", ["budget = 'tiny'", "full", "smoke"], id="unknown-budget"),
    pytest.param("data.split_seed", -1, ["data.split_seed = -1", ">= 0"],
                 id="negative-split-seed"),
    pytest.param("data.split_seed", "42", ["data.split_seed = '42'", "an integer or null"],
                 id="string-split-seed"),
    pytest.param("data.checksums", {"cifar-10-python.tar.gz": "abc"},
                 ["data.checksums", "32-hex MD5"], id="bad-checksum"),
    pytest.param("data.checksums", ["x"], ["data.checksums", "must be a mapping"],
                 id="checksums-not-a-mapping"),
    pytest.param("data.mirror", None, ["data.mirror = None", "must be a string"],
                 id="null-mirror"),
    pytest.param("classifier.milestones", [135, 90], ["classifier.milestones = [135, 90]",
                                                      "increasing positive epoch numbers"],
                 id="decreasing-milestones"),
    pytest.param("classifier.milestones", 90, ["classifier.milestones = 90", "must be a list"],
                 id="milestone-not-a-list"),
    pytest.param("classifier.gamma", 0.0, ["classifier.gamma = 0.0", "> 0.0"],
                 id="zero-gamma"),
    pytest.param("classifier.augmentation.hflip", "yes",
                 ["classifier.augmentation.hflip = 'yes'", "true or false"], id="string-hflip"),
    pytest.param("classifier.augmentation.rotate_degrees", 270.0,
                 ["classifier.augmentation.rotate_degrees = 270.0", "<= 180"],
                 id="rotation-above-range"),
    pytest.param("classifier.augmentation.crop_padding", -4,
                 ["classifier.augmentation.crop_padding = -4", ">= 0"], id="negative-padding"),
    pytest.param("confidnet.features", "fresh", ["confidnet.features = 'fresh'",
                                                 "valid values: dropout, no_dropout, "
                                                 "cached"],
                 id="unknown-features-mode"),
    pytest.param("confidnet.error_weight", 0.0, ["confidnet.error_weight = 0.0", "> 0.0"],
                 id="zero-error-weight"),
]


def test_error_weight_needs_a_loss_that_weighs_errors(base_params) -> None:
    params = with_value(with_value(base_params, "loss", "focal"), "confidnet.error_weight", 4.0)
    with pytest.raises(ParamsError) as info:
        validate(params)
    assert "confidnet.error_weight = 4.0" in str(info.value)
    assert "mse, bce" in str(info.value) and "loss = 'focal'" in str(info.value)
    validate(with_value(params, "loss", "bce"))


@pytest.mark.parametrize(("path", "value", "expected"), BAD_ROWS)
def test_invalid_value_is_reported(base_params, path: str, value: Any,
                                   expected: list[str]) -> None:
    params = with_value(base_params, path, value)
    with pytest.raises(ParamsError) as info:
        validate(params)
    message = str(info.value)
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    # exactly one problem per row (the rest of the file is valid)
    assert message.count("\n  ") == 1, message


def test_typed_config_mirrors_the_dict(base_params) -> None:
    config = load_config(PARAMS_FILE)
    assert isinstance(config, Params)
    assert config.model_dump() == base_params
    assert config.confidnet.features == base_params["confidnet"]["features"]
    assert isinstance(config.checkpoint_every_seconds, float)  # `30` in the file
    with pytest.raises(ValidationError):  # frozen: a stage cannot change its params
        config.confidnet.epochs = 1


def test_validate_returns_the_dict_as_written(base_params) -> None:
    params = with_value(base_params, "classifier.lr", 1)  # no coercion to 1.0
    assert validate(params)["classifier"]["lr"] == 1 and validate(params) is params


@pytest.mark.parametrize(("value", "expected"), [
    ([1], "params.yaml: must be a mapping of keys, got [1]"),
    (None, "params.yaml: must be a mapping of keys, got None"),
])
def test_whole_file_not_a_mapping(value: Any, expected: str) -> None:
    with pytest.raises(ParamsError, match=re.escape(expected)):
        validate(value)


@pytest.mark.parametrize(("path", "value", "expected"), [
    ("data.test_fraction", float("inf"), "data.test_fraction = inf: must be a finite number"),
    ("classifier.lr", float("nan"), "classifier.lr = nan: must be a finite number"),
    ("classifier.milestones", [0, 3], "increasing positive epoch numbers"),
    ("classifier.milestones", [True], "increasing positive epoch numbers"),
    ("classifier.augmentation", None, "classifier.augmentation: must be a mapping of keys"),
    ("confidnet.features", 3, "valid values: dropout, no_dropout, cached"),
    ("data.split_seed", True, "must be an integer or null, not a boolean"),
    ("zzzz", 1, "zzzz: unknown key (known: setting, budget, seed,"),
])
def test_more_invalid_values(base_params, path: str, value: Any, expected: str) -> None:
    with pytest.raises(ParamsError) as info:
        validate(with_value(base_params, path, value))
    assert expected in str(info.value) and str(info.value).count("\n  ") == 1


def test_params_error_is_a_value_error() -> None:
    assert issubclass(ParamsError, ValueError)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_valid_devices_pass(base_params, device: str) -> None:
    validate(with_value(base_params, "device", device))


@pytest.mark.parametrize(("path", "value"), [
    ("classifier.lr", 1),  # an int where a number is expected is fine
    ("confidnet.focal_gamma", 0),
    ("finetune.epochs", 0),  # fine-tuning may be switched off
    ("data.test_fraction", 0.9),  # upper bound inclusive
    ("confidnet.focal_alpha", 1.0),
    ("criterion", "tcp_r"),
    ("loss", "ranking"),
])
def test_boundary_values_pass(base_params, path: str, value: Any) -> None:
    validate(with_value(base_params, path, value))


@pytest.mark.parametrize("path", ["classifier.lr", "data.test_fraction",
                                  "confidnet.focal_alpha"])
def test_nan_is_rejected(base_params, path: str) -> None:
    with pytest.raises(ParamsError, match=re.escape(path)):
        validate(with_value(base_params, path, float("nan")))


def test_every_problem_reported_at_once(base_params) -> None:
    params = with_value(base_params, "loss", "hinge")
    params = with_value(params, "classifier.epochs", 0)
    params = with_value(params, "data.val_fraction", MISSING)
    params["extra"] = 1
    with pytest.raises(ParamsError) as info:
        validate(params)
    message = str(info.value)
    for part in ("loss = 'hinge'", "classifier.epochs = 0", "data.val_fraction: missing",
                 "extra: unknown key"):
        assert part in message
    assert message.count("\n  ") == 4


def test_validate_does_not_modify_params(base_params) -> None:
    params = copy.deepcopy(base_params)
    validate(params)
    assert params == base_params


def test_load_params_from_file(tmp_path: Path, base_params) -> None:
    good = tmp_path / "params.yaml"
    good.write_text(yaml.safe_dump(base_params))
    assert load_params(good) == base_params

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(with_value(base_params, "loss", "hinge")))
    with pytest.raises(ParamsError, match="loss = 'hinge'"):
        load_params(bad)

    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ParamsError, match="seed: missing"):
        load_params(empty)

    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "absent.yaml")


def test_scientific_notation_written_by_dvc_is_a_number(tmp_path) -> None:
    # `dvc exp run -S finetune.lr=1e-6` writes `lr: 1e-06`, a string to plain PyYAML
    text = PARAMS_FILE.read_text().replace("lr: 1.0e-06", "lr: 1e-06")
    assert "1e-06" in text
    (tmp_path / "params.yaml").write_text(text)
    params = load_params(tmp_path / "params.yaml")
    assert params["finetune"]["lr"] == 1e-6


def test_params_yaml_is_what_dvc_composes_from_conf() -> None:
    """`dvc exp run` (Hydra composition) rewrites params.yaml from conf/: the committed file
    must be that output, or the first experiment would silently change the defaults."""
    from pipeline.settings import compose

    assert PARAMS_FILE.read_text() == compose(root=PARAMS_FILE.parent)


PAPER_PRESETS = {  # setting: (dataset, model, epochs, lr, weight decay) from the authors' notes
    "mnist_mlp": ("mnist", "mlp", 100, 1e-3, 1e-4),
    "mnist_smallconv": ("mnist", "smallconv_mnist", 100, 1e-3, 1e-4),
    "svhn_smallconv": ("svhn", "smallconv_svhn", 100, 1e-3, 1e-4),
    "cifar10_vgg16": ("cifar10", "vgg16", 250, 1e-3, 5e-4),
    "cifar100_vgg16": ("cifar100", "vgg16", 170, 0.1, 1e-4),
}


@pytest.mark.parametrize("setting", [*PAPER_PRESETS, "digits_mlp"])
def test_every_preset_composes_to_valid_params(setting: str) -> None:
    from pipeline.settings import compose

    params = validate(yaml.safe_load(compose([f"setting={setting}"], root=PARAMS_FILE.parent)))
    assert params["setting"] == setting
    if setting in PAPER_PRESETS:
        dataset, model, epochs, lr, weight_decay = PAPER_PRESETS[setting]
        cfg = params["classifier"]
        assert (params["dataset"], cfg["model"], cfg["epochs"], cfg["lr"],
                cfg["weight_decay"]) == (dataset, model, epochs, lr, weight_decay)
        assert (cfg["batch_size"], cfg["momentum"]) == (128, 0.9)
        assert params["data"]["split_seed"] == 42 and params["data"]["val_fraction"] == 0.1
        confidnet = params["confidnet"]
        assert (confidnet["epochs"], confidnet["lr"], confidnet["batch_size"]) == (500, 1e-4, 128)


def test_preset_details_and_overrides() -> None:
    from pipeline.settings import compose

    def composed(*overrides: str) -> dict[str, Any]:
        return yaml.safe_load(compose(list(overrides), root=PARAMS_FILE.parent))

    cifar100 = composed("setting=cifar100_vgg16")["classifier"]
    assert cifar100["milestones"] == [90, 135] and cifar100["gamma"] == 0.1
    assert cifar100["augmentation"] == {"hflip": True, "rotate_degrees": 0.0, "crop_padding": 4}
    cifar10 = composed("setting=cifar10_vgg16")["classifier"]
    assert cifar10["milestones"] == []
    assert cifar10["augmentation"] == {"hflip": True, "rotate_degrees": 15.0, "crop_padding": 0}
    # any single knob still overrides the preset; the budget overrides the setting
    overridden = composed("setting=cifar10_vgg16", "classifier.epochs=7", "seed=3")
    assert overridden["classifier"]["epochs"] == 7 and overridden["seed"] == 3
    assert overridden["classifier"]["lr"] == 1e-3
    smoke = composed("setting=cifar100_vgg16", "budget=smoke")
    assert smoke["budget"] == "smoke"
    assert (smoke["classifier"]["epochs"], smoke["confidnet"]["epochs"],
            smoke["finetune"]["epochs"]) == (1, 1, 1)
    assert smoke["classifier"]["milestones"] == [90, 135]


def test_unknown_setting_names_the_presets() -> None:
    from hydra.errors import HydraException

    from pipeline.settings import compose

    with pytest.raises(HydraException, match="cifar10_vgg16"):
        compose(["setting=cifar10"], root=PARAMS_FILE.parent)


# ------------------------------------------- registry names, read without importing

REGISTRIES = [("pipeline.models", "MODELS"), ("pipeline.data", "DATASETS"),
              ("pipeline.losses", "LOSSES"), ("pipeline.losses", "CRITERIA")]


@pytest.mark.parametrize(("module", "registry"), REGISTRIES)
def test_registry_names_read_from_the_source_are_the_registry_names(
        module: str, registry: str) -> None:
    """Validation reads a registry's names from its module's source when it can (the
    models': importing them imports torch); that reading is the registry's own."""
    import importlib

    from pipeline.registry import _literal_registrations, registered_names

    live = getattr(importlib.import_module(module), registry).names()
    literal = _literal_registrations(module, registry)
    assert literal is None or sorted(literal) == live
    assert registered_names(module, registry) == live
    if module == "pipeline.models":
        assert literal is not None, "the models' names must be readable without torch"


def test_registry_names_of_a_computed_registration_come_from_the_module(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A name the source does not spell out is never guessed: the module is imported."""
    (tmp_path / "fake_registry.py").write_text(
        "from pipeline.registry import Registry\n"
        "THINGS = Registry('thing')\n"
        "THINGS.register('literal')(1)\n"
        "for name in ('a', 'b'):\n"
        "    THINGS.register(name)(2)\n")
    (tmp_path / "plain_registry.py").write_text(
        "from pipeline.registry import Registry\n"
        "THINGS = Registry('thing')\n"
        "@THINGS.register('z')\n"
        "def z() -> None: ...\n"
        "@THINGS.register('y')\n"
        "def y() -> None: ...\n"
        "import sys\n"
        "sys.stderr.write('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fake_registry", raising=False)
    monkeypatch.delitem(sys.modules, "plain_registry", raising=False)
    from pipeline.registry import _literal_registrations, registered_names

    assert _literal_registrations("fake_registry", "THINGS") is None
    assert registered_names("fake_registry", "THINGS") == ["a", "b", "literal"]
    assert registered_names("plain_registry", "THINGS") == ["y", "z"]
    assert "plain_registry" not in sys.modules  # read, not run
