"""The errors a stage reports as one message and exit status 2 (no traceback): bad params
and unusable data. Plumbing and science both raise them, so they live apart from both."""

from __future__ import annotations

import zipfile
from pathlib import Path


class ParamsError(ValueError):
    """Invalid ``params.yaml``; the message lists every problem found."""


# What breaks when a file is truncated, overwritten or half-downloaded: np.load and
# json.loads raise these (KeyError for a missing array or field).
READ_ERRORS = (zipfile.BadZipFile, EOFError, ValueError, KeyError, OSError)


class DataError(Exception):
    """A prepared dataset folder that cannot be used: unreadable, truncated or
    inconsistent. The message names the file and how to get a good copy back."""

    def __init__(self, path: Path | str, problem: str, fix: str | None = None) -> None:
        self.path = Path(path)
        self.problem = problem
        folder = self.path.parent if self.path.suffix else self.path
        if fix is None:
            fix = (f"The prepared dataset is corrupt or incomplete: delete {folder.as_posix()}/ "
                   "and run `dvc repro download` (or `dvc pull`).")
        super().__init__(f"{self.path}: {problem}\n  {fix}")


class UnknownDatasetError(DataError, KeyError):
    """``split.json`` names a dataset this code does not register (also a ``KeyError``,
    as the registry lookup raised before)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])
