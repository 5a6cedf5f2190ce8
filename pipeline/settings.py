"""The paper's settings as version-controlled presets, composed into ``params.yaml``.

``conf/config.yaml`` holds the knobs every setting shares; ``conf/setting/<name>.yaml`` holds
one setting's dataset, architecture and training schedule (paper Sec. 3.1 and the authors'
configs). DVC's Hydra composition (``hydra.enabled`` in ``.dvc/config``) writes the result
into ``params.yaml`` on every ``dvc exp run``, so switching the whole pipeline is one
tracked command, and any single knob still overrides the preset::

    dvc exp run -S setting=cifar10_vgg16
    dvc exp run -S setting=cifar10_vgg16 -S classifier.epochs=10
    dvc exp run -S setting=cifar10_vgg16 -S budget=smoke   # one epoch per phase

For a plain ``dvc repro``, write ``params.yaml`` the same way first::

    python -m pipeline.settings setting=cifar10_vgg16 classifier.epochs=10
    dvc repro

``dvc exp run`` rewrites ``params.yaml`` from ``conf/``: edit the presets (or pass ``-S``),
not ``params.yaml``, when running experiments.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

CONF_DIR = Path("conf")
CONFIG_NAME = "config"


def preset_names(group: str = "setting", root: Path = Path()) -> list[str]:
    """The presets of ``conf/<group>/`` (``setting`` or ``budget``) in the project at ``root``."""
    return sorted(path.stem for path in (root / CONF_DIR / group).glob("*.yaml"))


def compose(overrides: Sequence[str] = (), root: Path = Path()) -> str:
    """``params.yaml`` text for ``overrides`` (Hydra syntax, as ``dvc exp run -S`` takes
    them), byte for byte what DVC's composition writes."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str((root / CONF_DIR).resolve()), version_base=None):
        config = hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides))
    OmegaConf.resolve(config)
    return OmegaConf.to_yaml(config)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Compose params.yaml from conf/ (as `dvc exp run -S` does), for `dvc repro`")
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides, e.g. setting=mnist_mlp classifier.epochs=5")
    parser.add_argument("--list", action="store_true", help="list the settings and exit")
    parser.add_argument("--out", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(preset_names()))
        return
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        text = compose(args.overrides)
    except (HydraException, OmegaConfBaseException) as error:
        raise SystemExit(f"error: {error}") from None
    from pipeline.io import atomic_write_text

    atomic_write_text(args.out, text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
