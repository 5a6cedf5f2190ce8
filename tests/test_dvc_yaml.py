"""``dvc.yaml`` against the code: each stage's deps list exactly the project modules its
entry point runs (followed through every import, plumbing included) and the data it
reads; its outputs are those of ``pipeline.artifacts``; and the modules form no import
cycle, plumbing never importing science. These keep ``dvc repro`` from leaving results
stale after a code change."""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
import yaml

from pipeline import artifacts, dvcfile

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")
STAGES = dvcfile.stages(REPO / "dvc.yaml")

# Plumbing: what runs around every stage. None of it may import a science module (data,
# models, training, scoring, metrics, reporting), so a stage's deps stay what it uses.
PLUMBING = {"pipeline.stage", "pipeline.config", "pipeline.errors", "pipeline.runtime",
            "pipeline.io", "pipeline.artifacts", "pipeline.tracking", "pipeline.registry",
            "pipeline.dvcfile", "pipeline.settings", "pipeline.distributed", "pipeline.warm"}


def module_path(name: str) -> Path | None:
    """The file of project module ``name``, None for anything else (a third-party module,
    or a name imported from a project module)."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def imports(name: str) -> frozenset[str]:
    """The project modules that module ``name`` imports, anywhere in its source (inside
    functions too: code a stage runs whenever that function runs)."""
    path = module_path(name)
    assert path is not None, name
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        candidates: list[str] = []
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pipeline import tracking` imports a module; `from pipeline.io import
            # read_json` a name of one
            candidates = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        for candidate in candidates:
            if module_path(candidate) is not None:
                found.add(candidate)
    return frozenset(found - {name})


def closure(name: str) -> set[str]:
    """``name`` and every project module it reaches through imports."""
    seen, todo = set(), [name]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += imports(module)
    return seen


def project_modules() -> Iterator[str]:
    for package in PACKAGES:
        for path in sorted((REPO / package).glob("*.py")):
            yield module_name(path)


def code_deps(stage: str) -> set[str]:
    """The files ``dvc.yaml`` should list as code deps of ``stage``: package
    ``__init__`` files excepted, which hold no code (checked below)."""
    return {module_path(m).relative_to(REPO).as_posix() for m in closure(f"stages.{stage}")
            if module_path(m).name != "__init__.py"}


def is_code(dep: Path) -> bool:
    return dep.parts[0] in PACKAGES and dep.suffix == ".py"


@pytest.mark.parametrize("stage", list(STAGES))
def test_code_deps_are_what_the_stage_imports(stage: str) -> None:
    declared = {p.as_posix() for p in dvcfile.paths(STAGES[stage], "deps") if is_code(p)}
    expected = code_deps(stage)
    missing, extra = sorted(expected - declared), sorted(declared - expected)
    assert not missing and not extra, (
        f"dvc.yaml stage {stage!r}: deps miss {missing} (imported by stages/{stage}.py, "
        f"directly or not) and list {extra} (not imported)")


def package_data() -> dict[str, str]:
    """The files shipped beside the code (pyproject's package-data: the paper's numbers,
    templates), by file name: their paths relative to the repository."""
    return {p.name: p.relative_to(REPO).as_posix() for package in PACKAGES
            for p in (REPO / package).rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc")}


def data_files_read(stage: str) -> set[str]:
    """The package data files that the code ``stage`` runs names (a string constant equal
    to the file's name, as in ``Path(__file__).with_name("paper_results.yaml")``).
    ``pipeline.artifacts`` is left out: it names every stage's files, reading none."""
    shipped, found = package_data(), set()
    for module in closure(f"stages.{stage}") - {"pipeline.artifacts"}:
        path = module_path(module)
        assert path is not None, module
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and node.value in shipped:
                found.add(shipped[node.value])
    return found


@pytest.mark.parametrize("stage", list(STAGES))
def test_package_data_deps_are_the_files_the_stage_reads(stage: str) -> None:
    """A template or data file shipped with the package changes what a stage writes as
    much as its code does."""
    shipped = set(package_data().values())
    declared = {p.as_posix() for p in dvcfile.paths(STAGES[stage], "deps")} & shipped
    read = data_files_read(stage)
    assert declared == read, (
        f"dvc.yaml stage {stage!r}: deps miss {sorted(read - declared)} (read by the code "
        f"it runs) and list {sorted(declared - read)} (not read)")


def test_the_package_data_check_finds_the_report_template() -> None:
    assert {"pipeline/templates/report.md.j2", "pipeline/paper_results.yaml"} <= \
        data_files_read("report")
    # CamVid's manifest: named by pipeline/camvid.py, which every stage loading data imports
    assert data_files_read("download") == {"pipeline/manifests/camvid.md5"}
    assert not data_files_read("check_params")


@pytest.mark.parametrize("stage", list(STAGES))
def test_data_deps_and_outputs_are_the_artifacts(stage: str) -> None:
    spec, files = STAGES[stage], artifacts.STAGES[stage]
    data_deps = [p for p in dvcfile.paths(spec, "deps") if not is_code(p)]
    assert sorted(data_deps) == sorted(files.inputs), stage
    assert sorted(dvcfile.paths(spec, "outs", "metrics", "plots")) == sorted(files.outputs), \
        stage


def test_stages_are_the_artifacts_stages_and_run_their_module() -> None:
    assert tuple(STAGES) == artifacts.STAGE_ORDER
    for name, spec in STAGES.items():
        assert spec["cmd"] == f"python -m stages.{name}", name
        assert (REPO / "stages" / f"{name}.py").is_file(), name


def test_package_inits_hold_no_code() -> None:
    """They run on every import but are not deps: only a docstring is allowed."""
    for package in PACKAGES:
        body = ast.parse((REPO / package / "__init__.py").read_text()).body
        assert all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
                   for n in body), f"{package}/__init__.py holds code"


def test_no_import_cycles() -> None:
    modules = list(project_modules())
    for module in modules:
        for imported in imports(module):
            assert module not in closure(imported), (
                f"import cycle: {module} imports {imported}, which leads back to it")


def test_stages_import_only_from_pipeline() -> None:
    for module in project_modules():
        if module.startswith("stages."):
            assert not [m for m in imports(module) if m.startswith("stages")], module


def test_plumbing_imports_only_plumbing() -> None:
    for module in PLUMBING:
        science = sorted(closure(module) - PLUMBING)
        assert not science, f"{module} reaches {science}"


def test_the_deps_test_fails_on_a_missing_or_extra_dep() -> None:
    """The check above is able to fail: drop one module from a stage's deps, or list one
    it does not import."""
    declared = {p.as_posix() for p in dvcfile.paths(STAGES["evaluate"], "deps") if is_code(p)}
    assert declared == code_deps("evaluate")
    assert declared - {"pipeline/metrics.py"} != code_deps("evaluate")
    assert declared | {"pipeline/models.py"} != code_deps("evaluate")


def test_the_committed_lock_hashes_the_files_as_they_are() -> None:
    """dvc.lock records the md5 of every file dep as it was when the lock was made; a code
    change committed without `dvc repro` (or `dvc commit`) leaves it stale, and a fresh
    clone then reruns stages for nothing."""
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    stale = sorted({f"{stage}: {dep['path']}" for stage, entry in lock.items()
                    for dep in entry.get("deps", [])
                    if (REPO / dep["path"]).is_file()
                    and hashlib.md5((REPO / dep["path"]).read_bytes()).hexdigest()
                    != dep["md5"]})
    assert not stale, f"dvc.lock is stale (run `dvc repro`, then commit it): {stale}"
