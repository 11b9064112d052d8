"""Errors that mean "the user gave petmix something it cannot use".

The CLI prints them without a traceback and exits with status 2.
"""

from __future__ import annotations

from pathlib import Path


class PetmixError(Exception):
    """Bad user input (a file, a field, an option). Exit status 2 from the CLI."""

    exit_code = 2


class DataError(PetmixError):
    """A problem with a data file: names the file and the problem."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = str(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)
