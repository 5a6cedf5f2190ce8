"""A small name -> object registry, the single place where a dataset, model, loss or
scoring function becomes selectable from ``params.yaml``."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; unknown names raise a ``KeyError`` listing the valid ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def __getitem__(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())


def registered_names(module: str, registry: str) -> list[str]:
    """The names registered in ``module``'s registry ``registry``, sorted, as
    ``module.registry.names()`` gives them, without running ``module`` when it is not
    imported yet and every registration in its source reads ``registry.register("name")``
    with a literal name: importing a module of models imports torch (seconds), which
    checking a name in ``params.yaml`` must not cost a stage that computes without it.
    Otherwise (already imported, a name computed at run time) the module's registry
    itself. Tests check that both readings agree for every registry."""
    loaded = sys.modules.get(module)
    if loaded is None:
        literal = _literal_registrations(module, registry)
        if literal is not None:
            return sorted(literal)
        loaded = importlib.import_module(module)
    names: list[str] = getattr(loaded, registry).names()
    return names


def _literal_registrations(module: str, registry: str) -> list[str] | None:
    """The names of ``registry.register("name")`` calls in ``module``'s source; None when
    one of them names something else than a string literal, or there are none."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"), spec.origin)
    names = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "register" and isinstance(node.func.value, ast.Name)
                and node.func.value.id == registry):
            continue
        args = node.args
        if node.keywords or len(args) != 1 or not isinstance(args[0], ast.Constant) \
                or not isinstance(args[0].value, str):
            return None
        names.append(args[0].value)
    return names or None
