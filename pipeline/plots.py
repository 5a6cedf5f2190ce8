"""How `dvc plots show` draws the pipeline's curves: one distinct colour per scoring method,
and an HTML page that renders with no network.

Two committed files come from here, and the tests check both:

- ``.dvc/plots/by_method.json``, the Vega-Lite template of the risk-coverage (paper Fig. 3)
  and error precision-recall plots: one step line per method, each method in its own
  colour (DVC's default palette has 7 colours, Vega's 10, for the 12 methods that
  ``stages/evaluate.py`` writes), the legend in the report's names, and the paper's
  methods drawn thicker. ``python -m pipeline.plots template`` rewrites it from
  ``METHOD_COLOURS`` and ``pipeline.methods``.
- ``.dvc/plots/offline.html``, the page DVC fills (``plots.html_template`` in
  ``.dvc/config``). DVC's default page loads Vega, Vega-Lite and Vega-Embed from a CDN,
  so offline it is blank; this one carries their minified builds inline, with their
  license notices. ``python -m pipeline.plots vendor`` rebuilds it from the npm registry
  (it needs ``npm`` and the network; nothing else here does).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.methods import METHOD_LABELS, PAPER_METHODS, ordered_methods

BY_METHOD_TEMPLATE = Path(".dvc/plots/by_method.json")
HTML_TEMPLATE = Path(".dvc/plots/offline.html")

# One colour per method that the evaluate stage scores; tests/test_plots.py checks that
# every two differ by a CIE76 colour difference of 25 or more. The paper's methods take
# Okabe and Ito's colour-blind-safe hues (and are drawn thicker); the other six baselines
# were picked from Tableau's and Paul Tol's palettes to stay as far from those and from
# each other as 12 hues allow (every pair 33 or more apart).
METHOD_COLOURS: dict[str, str] = {
    "mcp": "#0072B2",  # blue
    "mcp_temperature": "#17BECF",  # cyan
    "entropy": "#8C564B",  # brown
    "max_logit": "#C7C7C7",  # light grey
    "energy": "#DDCC77",  # sand
    "doctor": "#6A3D9A",  # dark purple
    "mc_dropout": "#009E73",  # bluish green
    "mc_dropout_mutual_information": "#2CA02C",  # green
    "trustscore": "#E69F00",  # orange
    "confidnet": "#CC79A7",  # reddish purple
    "confidnet_finetuned": "#D55E00",  # vermillion
    "tcp_oracle": "#000000",  # black
}

# The page's scripts: the majors DVC's own page loads (vega 5, vega-lite 5, vega-embed 6),
# at their latest releases when vendored. Order matters: each needs the previous ones.
VEGA_PACKAGES: dict[str, str] = {"vega": "5.33.1", "vega-lite": "5.23.0",
                                 "vega-embed": "6.29.0"}


def _legend_label(method: str) -> str:
    # "(baseline)" and "(uses labels)" in the report's names say what the colour and the
    # line width already say here; the short name keeps the legend narrow.
    return METHOD_LABELS.get(method, method).split(" (")[0]


def by_method_template(colours: Mapping[str, str] = METHOD_COLOURS) -> dict[str, Any]:
    """The Vega-Lite template (DVC's ``<DVC_METRIC_*>`` anchors) of a plot whose CSV has a
    ``method`` column: a step line per method (risk and precision change only at a
    threshold), coloured from ``colours`` in the display order of ``pipeline.methods``,
    the paper's methods thicker, a dash per DVC revision, and a click on a legend entry
    highlighting that method."""
    methods = ordered_methods(list(colours))
    labels = [{"method": m, "label": _legend_label(m), "paper": m in PAPER_METHODS}
              for m in methods]
    x, y = "<DVC_METRIC_X>", "<DVC_METRIC_Y>"
    return {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "description": "One curve per scoring method. Written by `python -m pipeline.plots "
                       "template` from pipeline/plots.py: edit that, not this file.",
        "data": {"values": "<DVC_METRIC_DATA>"},
        "title": "<DVC_METRIC_TITLE>",
        "width": 420,
        "height": 320,
        "transform": [
            {"lookup": "method", "from": {"data": {"values": labels}, "key": "method",
                                          "fields": ["label", "paper"]}},
            # A method missing from the lookup keeps its own name, so it still shows.
            {"calculate": "datum.label || datum.method", "as": "label"},
        ],
        "params": [{"name": "picked", "select": {"type": "point", "fields": ["label"]},
                    "bind": "legend"}],
        "mark": {"type": "line", "interpolate": "step-after"},
        "encoding": {
            "x": {"field": x, "type": "quantitative", "title": "<DVC_METRIC_X_LABEL>"},
            "y": {"field": y, "type": "quantitative", "title": "<DVC_METRIC_Y_LABEL>"},
            "color": {
                "field": "label", "type": "nominal",
                "scale": {"domain": [entry["label"] for entry in labels],
                          "range": [colours[m] for m in methods]},
                "legend": {"title": "method (click: highlight)"},
            },
            "strokeWidth": {"condition": {"test": "datum.paper", "value": 2.5},
                            "value": 1.2},
            "opacity": {"condition": {"param": "picked", "value": 1}, "value": 0.12},
            "strokeDash": {"field": "rev", "type": "nominal", "title": "revision"},
            "order": {"field": x, "type": "quantitative"},
            "tooltip": [{"field": "label", "title": "method"}, {"field": "rev"},
                        {"field": x, "type": "quantitative"},
                        {"field": y, "type": "quantitative"}],
        },
    }


def template_text() -> str:
    return json.dumps(by_method_template(), indent=2) + "\n"


@dataclass(frozen=True)
class Script:
    """A vendored build: its package, version, license and minified code."""

    package: str
    version: str
    license: str
    license_text: str | None
    code: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.code.encode()).hexdigest()


def _notice(scripts: Sequence[Script]) -> str:
    """The license notices the BSD-3-Clause terms ask a binary redistribution to carry."""
    lines = ["Vendored so that the page renders without network access; rebuilt by",
             "`python -m pipeline.plots vendor` from the npm registry.", ""]
    for s in scripts:
        lines.append(f"{s.package} {s.version} (build/{s.package}.min.js, sha256 {s.sha256}),"
                     f" license {s.license}.")
    lines += ["", "The builds bundle their own dependencies (the d3 modules in vega;",
              "fast-json-patch, json-stringify-pretty-compact, semver, vega-themes and",
              "vega-tooltip in vega-embed), under their own permissive licenses (ISC, MIT,",
              "BSD-3-Clause): see each package on npm."]
    texts: dict[str, list[str]] = {}
    for s in scripts:
        if s.license_text:
            texts.setdefault(s.license_text.strip(), []).append(s.package)
    missing = [s.package for s in scripts if not s.license_text]
    for text, packages in texts.items():
        lines += ["", f"License of {', '.join(packages)}:", "", text]
    if missing:
        lines += ["", f"{', '.join(missing)}: the npm package ships no LICENSE file; its",
                  "package.json names the license above and the same authors (UW Interactive",
                  "Data Lab)."]
    return "\n".join(lines)


def offline_page(scripts: Sequence[Script]) -> str:
    """DVC's page (``dvc_render.html.PAGE_HTML``) with ``scripts`` inline in place of its
    ``{scripts}`` placeholder, which is where DVC would put its CDN ``<script src>`` tags:
    a template without that placeholder gets none."""
    blocks = []
    for s in scripts:
        for marker in ("</script", "{plot_divs}", "{scripts}", "{refresh_tag}"):
            if marker in s.code:
                # An inline script ends at the first "</script"; DVC fills the page by
                # plain string replacement of the placeholders.
                raise ValueError(f"{s.package} {s.version}: its build contains {marker!r}, "
                                 "which cannot be inlined in DVC's page as is")
        blocks.append(f"<script>/* {s.package} {s.version}, {s.license} */\n{s.code}\n</script>")
    notice = _notice(scripts)
    if "--" in notice:
        raise ValueError("the license notice contains '--', which would end its HTML comment")
    return "\n".join([
        "<!DOCTYPE html>",
        "<html>",
        "<head>",
        '<meta charset="utf-8">',
        "{refresh_tag}",
        "<title>DVC plots</title>",
        f"<!--\n{notice}\n-->",
        *blocks,
        "<style>",
        "  body { font-family: sans-serif; }",
        "  table { border-spacing: 15px; }",
        "</style>",
        "</head>",
        "<body>",
        "{plot_divs}",
        "</body>",
        "</html>",
        "",
    ])


def fetch_scripts(packages: Mapping[str, str] = VEGA_PACKAGES) -> list[Script]:
    """Each package's ``build/<name>.min.js`` and license, from `npm pack` (which checks
    the registry's integrity hash) in a temporary folder."""
    found = []
    with tempfile.TemporaryDirectory() as tmp:
        specs = [f"{name}@{version}" for name, version in packages.items()]
        proc = subprocess.run(["npm", "pack", "--silent", *specs], cwd=tmp, text=True,
                              capture_output=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"error: `npm pack {' '.join(specs)}` failed "
                             f"(exit {proc.returncode}):\n{proc.stderr.strip()}")
        for name, version in packages.items():
            with tarfile.open(Path(tmp) / f"{name}-{version}.tgz") as tar:
                members = set(tar.getnames())

                def read(member: str, tar: tarfile.TarFile = tar) -> str:
                    file = tar.extractfile(member)
                    assert file is not None, member
                    return file.read().decode("utf-8")

                meta = json.loads(read("package/package.json"))
                license_text = (read("package/LICENSE") if "package/LICENSE" in members
                                else None)
                found.append(Script(name, meta["version"], meta["license"], license_text,
                                    read(f"package/build/{name}.min.js").strip()))
    return found


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("template", "vendor"),
                        help=f"template: write {BY_METHOD_TEMPLATE} (no network); "
                             f"vendor: rebuild {HTML_TEMPLATE} from npm")
    parser.add_argument("--root", type=Path, default=Path(), help="the project root")
    args = parser.parse_args(argv)
    if args.what == "template":
        path, text = args.root / BY_METHOD_TEMPLATE, template_text()
    else:
        path, text = args.root / HTML_TEMPLATE, offline_page(fetch_scripts())
    path.write_text(text, encoding="utf-8")
    sys.stderr.write(f"wrote {path} ({len(text.encode()):,} bytes)\n")


if __name__ == "__main__":
    main()
