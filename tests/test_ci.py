"""CI runs what the README tells users to run: `.ci/run` ends in the README's test command
(options that change what runs, such as `-m` or `-n`, belong in `pyproject.toml`'s addopts,
which both read)."""

from __future__ import annotations

import re
import shlex

from conftest import REPO


def readme_test_command() -> list[str]:
    readme = (REPO / "README.md").read_text()
    [line] = [line for line in readme.splitlines()
              if line.startswith("python3 -m venv") and "pytest" in line]
    return shlex.split(line.split("&&")[-1])


def test_ci_runs_the_readmes_test_command() -> None:
    command = readme_test_command()
    assert command[:3] == ["python", "-m", "pytest"], command
    ci = (REPO / ".ci" / "run").read_text()
    runs = [shlex.split(line) for line in ci.splitlines()
            if re.match(r"\s*python -m pytest\b", line)]
    # -q only changes how much it prints
    assert [[a for a in r if a != "-q"] for r in runs] == [command], runs


def test_addopts_print_the_slowest_and_use_every_core() -> None:
    # (tomllib is Python 3.11+; the project supports 3.10)
    found = re.search(r'(?m)^addopts = "([^"]*)"$', (REPO / "pyproject.toml").read_text())
    assert found, "no addopts line in pyproject.toml"
    addopts = found[1].split()
    assert "--durations=20" in addopts
    assert addopts[addopts.index("-n") + 1] == "auto" and "loadfile" in addopts
