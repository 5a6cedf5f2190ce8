"""`dvc plots show`: the page renders with no network (Vega, Vega-Lite and Vega-Embed inline,
no CDN), every method the evaluate stage plots has its own colour, and every plot has a
title and axis labels. The real DVC fills the real templates in a temporary project."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, run

from pipeline import plots
from pipeline.baselines import SCORERS
from pipeline.methods import CHALLENGERS, PAPER_METHODS

PAGE = REPO / plots.HTML_TEMPLATE
# What stages/evaluate.py writes a curve for: every registered scorer and both ConfidNets.
PLOTTED_METHODS = {*SCORERS.names(), *CHALLENGERS}
# A reference to anything outside the page: a src/href/url() naming a scheme-relative or
# http(s) address. (The inline code holds URLs as strings, e.g. Vega-Lite's $schema and
# SVG's namespace; it is what the browser fetches that matters.)
NETWORK_REFERENCE = re.compile(
    r"""(?:\b(?:src|href)\s*=\s*["']?|url\(\s*["']?|@import\s+["']?)(?:https?:)?//""", re.I)
# CIE76 colour difference below which two thin lines are easily mistaken on screen (2.3 is
# a just-noticeable difference; the methods' colours are all 33 or more apart).
MIN_COLOUR_DIFFERENCE = 25.0


def cielab(hex_colour: str) -> tuple[float, float, float]:
    """sRGB ``#RRGGBB`` to CIE L*a*b* (D65)."""
    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(int(hex_colour[i:i + 2], 16) / 255) for i in (1, 3, 5))
    xyz = ((0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047,
           0.2126 * r + 0.7152 * g + 0.0722 * b,
           (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883)
    fx, fy, fz = (t ** (1 / 3) if t > 0.008856 else 7.787 * t + 16 / 116 for t in xyz)
    return 116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)


def colour_difference(a: str, b: str) -> float:
    return sum((p - q) ** 2 for p, q in zip(cielab(a), cielab(b), strict=True)) ** 0.5


def dvc_yaml_plots() -> dict[str, dict[str, Any]]:
    """Every plot of dvc.yaml, stages' and top-level, by name, with its properties."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    found: dict[str, dict[str, Any]] = {}
    entries = [*(e for s in spec["stages"].values() for e in s.get("plots", [])),
               *spec.get("plots", [])]
    for entry in entries:
        items = entry.items() if isinstance(entry, dict) else [(entry, {})]
        for name, props in items:
            found[name] = props or {}
    return found


# --- the page -------------------------------------------------------------------------


def test_the_page_inlines_the_three_libraries_and_loads_nothing() -> None:
    page = PAGE.read_text(encoding="utf-8")
    assert "<script src" not in page.lower()
    assert not NETWORK_REFERENCE.search(page), NETWORK_REFERENCE.search(page)
    # DVC puts its CDN <script src> tags where "{scripts}" is: the page must not have it.
    assert "{plot_divs}" in page and "{scripts}" not in page
    scripts = re.findall(r"<script>/\* (\S+) (\S+), (\S+) \*/\n(.*?)\n</script>", page, re.S)
    assert [(name, version) for name, version, _, _ in scripts] == \
        list(plots.VEGA_PACKAGES.items())
    globals_set = {"vega": "vega={}", "vega-lite": "vegaLite={}", "vega-embed": "vegaEmbed="}
    for name, version, license_id, code in scripts:
        assert license_id == "BSD-3-Clause"
        assert globals_set[name] in code[:2000], f"{name}: not its UMD build"
        # The notice names the exact build inlined.
        assert f"{name} {version} (build/{name}.min.js, sha256 " \
               f"{hashlib.sha256(code.encode()).hexdigest()})" in page
    assert 'var n="5.23.0"' in scripts[1][3]  # vega-lite reports the version it is
    assert "Redistribution and use in source and binary forms" in page
    assert "University of Washington Interactive Data Lab" in page


def test_the_page_is_what_the_vendoring_writes() -> None:
    """The committed page is offline_page() of its own scripts: rebuilding it from npm
    (`python -m pipeline.plots vendor`) changes nothing but the scripts."""
    page = PAGE.read_text(encoding="utf-8")
    scripts = [plots.Script(name, version, license_id, None, code) for name, version,
               license_id, code in re.findall(
                   r"<script>/\* (\S+) (\S+), (\S+) \*/\n(.*?)\n</script>", page, re.S)]
    rebuilt = plots.offline_page(scripts)
    head = page.split("<!--", 1)[0]
    assert rebuilt.split("<!--", 1)[0] == head
    assert rebuilt.split("-->", 1)[1] == page.split("-->", 1)[1]


def test_a_build_that_cannot_be_inlined_is_refused() -> None:
    bad = plots.Script("vega", "0", "BSD-3-Clause", None, 'x="</script>"')
    with pytest.raises(ValueError, match="</script"):
        plots.offline_page([bad])


# --- colours and labels ---------------------------------------------------------------


def test_every_plotted_method_has_a_colour_of_its_own() -> None:
    colours = plots.METHOD_COLOURS
    assert set(colours) == PLOTTED_METHODS, (
        f"pipeline.plots.METHOD_COLOURS misses {sorted(PLOTTED_METHODS - set(colours))} and "
        f"has {sorted(set(colours) - PLOTTED_METHODS)}, which no stage plots")
    differences = {(a, b): colour_difference(colours[a], colours[b])
                   for a, b in itertools.combinations(colours, 2)}
    close = {pair: round(d) for pair, d in differences.items() if d < MIN_COLOUR_DIFFERENCE}
    assert not close, f"colours too alike (CIE76 difference < {MIN_COLOUR_DIFFERENCE}): {close}"


def test_the_committed_template_is_the_generated_one() -> None:
    committed = (REPO / plots.BY_METHOD_TEMPLATE).read_text()
    assert committed == plots.template_text(), \
        "run `python -m pipeline.plots template` and commit .dvc/plots/by_method.json"


def test_the_template_maps_each_method_to_its_colour() -> None:
    template = plots.by_method_template()
    colour = template["encoding"]["color"]
    lookup = template["transform"][0]["from"]["data"]["values"]
    labels = {row["method"]: row["label"] for row in lookup}
    assert set(labels) == PLOTTED_METHODS
    assert len(set(labels.values())) == len(labels), "two methods share a legend label"
    scale = dict(zip(colour["scale"]["domain"], colour["scale"]["range"], strict=True))
    assert {m: scale[labels[m]] for m in labels} == plots.METHOD_COLOURS
    assert {row["method"] for row in lookup if row["paper"]} == set(PAPER_METHODS)


def test_every_plot_in_dvc_yaml_has_a_title_and_axis_labels() -> None:
    found = dvc_yaml_plots()
    assert len(found) == 5, sorted(found)
    for name, props in found.items():
        for key in ("title", "x_label", "y_label"):
            assert str(props.get(key, "")).strip(), f"dvc.yaml plot {name!r} has no {key}"
        assert ".csv" not in props["title"], f"plot {name!r} is titled by its file"


# --- the real `dvc plots show` --------------------------------------------------------


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [",".join(rows[0])] + [",".join(str(v) for v in row.values()) for row in rows]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def shown(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, dict[str, Any]]]:
    """`dvc plots show` in a DVC project with this repository's dvc.yaml, .dvc/config and
    .dvc/plots/, and small CSVs of the pipeline's plots in the workspace: the page it
    writes, and the Vega-Lite spec of each plot as filled into that page."""
    project = tmp_path_factory.mktemp("plots")
    run(project, ["dvc", "init", "--no-scm", "-q"])
    shutil.copy(REPO / ".dvc" / "config", project / ".dvc" / "config")
    shutil.copytree(REPO / ".dvc" / "plots", project / ".dvc" / "plots", dirs_exist_ok=True)
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    methods = sorted(PLOTTED_METHODS)
    write_csv(project / "plots/risk_coverage.csv",
              [{"method": m, "coverage": c / 4, "risk": i * c / 400}
               for i, m in enumerate(methods) for c in range(1, 5)])
    write_csv(project / "plots/pr_error.csv",
              [{"method": m, "recall": r / 4, "precision": 1 - i * r / 100}
               for i, m in enumerate(methods) for r in range(5)])
    write_csv(project / "plots/classifier_curves.csv",
              [{"epoch": e, "val_accuracy": 0.5 + e / 10} for e in range(1, 4)])
    for name in ("confidnet_curves", "finetune_curves"):
        write_csv(project / f"plots/{name}.csv",
                  [{"epoch": e, "val_aupr_error": 0.2 + e / 100} for e in range(3)])
    run(project, ["dvc", "plots", "show", "-o", "shown"])
    page = (project / "shown" / "index.html").read_text(encoding="utf-8")
    specs = [json.loads(s) for s in re.findall(r"var spec = (\{.*\});\n", page)]
    return page, {title_text(spec): spec for spec in specs}


def title_text(spec: dict[str, Any]) -> str:
    title = spec["title"]
    return title["text"] if isinstance(title, dict) else title


def axis_titles(node: Any, channel: str) -> set[str]:
    """The titles of the ``channel`` encodings anywhere in a (possibly layered) spec."""
    found: set[str] = set()
    if isinstance(node, dict):
        encoding = node.get("encoding", {})
        if "title" in encoding.get(channel, {}):
            found.add(encoding[channel]["title"])
        for value in node.values():
            found |= axis_titles(value, channel)
    elif isinstance(node, list):
        for value in node:
            found |= axis_titles(value, channel)
    return found


def test_dvc_plots_show_writes_a_page_that_needs_no_network(
        shown: tuple[str, dict[str, dict[str, Any]]]) -> None:
    page, specs = shown
    assert "cdn.jsdelivr" not in page and "<script src" not in page.lower()
    assert not NETWORK_REFERENCE.search(page), NETWORK_REFERENCE.search(page)
    for name in plots.VEGA_PACKAGES:
        assert f"<script>/* {name} {plots.VEGA_PACKAGES[name]}," in page
    assert len(specs) == 5


def test_dvc_plots_show_titles_and_labels_every_plot(
        shown: tuple[str, dict[str, dict[str, Any]]]) -> None:
    _, specs = shown
    for name, props in dvc_yaml_plots().items():
        spec = specs.get(props["title"])
        assert spec is not None, f"no plot titled {props['title']!r} ({name}): {list(specs)}"
        assert axis_titles(spec, "x") == {props["x_label"]}, name
        assert axis_titles(spec, "y") == {props["y_label"]}, name


def test_dvc_plots_show_colours_each_method_on_its_own(
        shown: tuple[str, dict[str, dict[str, Any]]]) -> None:
    _, specs = shown
    by_method = [s for s in specs.values() if "transform" in s]
    assert len(by_method) == 2
    for spec in by_method:
        plotted = {row["method"] for row in spec["data"]["values"]}
        assert plotted == PLOTTED_METHODS
        labels = {row["method"]: row["label"]
                  for row in spec["transform"][0]["from"]["data"]["values"]}
        scale = spec["encoding"]["color"]["scale"]
        colours = dict(zip(scale["domain"], scale["range"], strict=True))
        assert len({colours[labels[m]] for m in plotted}) == len(plotted)
