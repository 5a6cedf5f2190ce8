"""What every ratio benchmark here shares: the command line (``--quick``, ``--repeats``,
``--out``), the machine line, interleaved min-of-N timing and the markdown table.

Ratios are measured in one run, the thing and its reference interleaved (A, B, A, B, ...)
and each kept at its fastest of ``--repeats``: load from other processes on the machine
slows a repeat, never speeds one up, so the minimum is the least disturbed figure and an
interleaved pair sees the same background.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


def parser(description: str, repeats: int = 3) -> argparse.ArgumentParser:
    """The common options; a script adds its own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes: checks that the script runs, measures nothing useful")
    p.add_argument("--repeats", type=int, default=repeats,
                   help=f"interleaved repeats, each figure the fastest (default {repeats})")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's own choice)")
    p.add_argument("--out", type=Path, default=None, help="also write the output (markdown)")
    return p


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """CPU model, cores, torch version and threads, load average and date: the context
    every figure needs."""
    load = os.getloadavg()
    return (f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads, load average {load[0]:.2f} "
            f"(1 min) / {load[1]:.2f} (5 min) at start; "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def interleaved(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Seconds of each callable, the fastest of ``repeats``, the callables taking turns
    within each repeat."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, fn in runs.items():
            best[name] = min(best[name], timed(fn)[0])
    return best


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


class Report:
    """Collects what the script prints; prints it as it comes and writes it to ``--out``."""

    def __init__(self, title: str, args: argparse.Namespace) -> None:
        if args.threads:
            torch.set_num_threads(args.threads)
        self.out: Path | None = args.out
        self.parts: list[str] = []
        self.add(f"# {title}\n\n{machine()}" + (" (--quick: tiny sizes)" if args.quick else ""))

    def add(self, text: str) -> None:
        print(text + "\n", flush=True)
        self.parts.append(text)

    def close(self) -> None:
        load = os.getloadavg()
        self.add(f"Load average {load[0]:.2f} (1 min) / {load[1]:.2f} (5 min) at the end.")
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text("\n\n".join(self.parts) + "\n")
