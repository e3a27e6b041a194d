"""Errors a user can act on.

Every problem the user can fix (a bad params file, a bad data file, an op the compiler
cannot handle) is raised as a ``UserError`` holding one or more ``Problem``s. The CLI prints
them as ``mmgraph: error: FILE: where: what`` and exits with status 2, without a traceback
unless ``--debug`` is given.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable, Sequence

EXIT_USER_ERROR = 2


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one input: ``file: where: message``."""

    file: str | None
    where: str | None
    message: str

    def __str__(self) -> str:
        parts = [p for p in (self.file, self.where) if p]
        return ": ".join(parts + [self.message])


class UserError(Exception):
    """An error caused by the user's input; carries every problem found, not just the first."""

    def __init__(self, problems: Problem | str | Sequence[Problem]):
        if isinstance(problems, (Problem, str)):
            problems = [problems if isinstance(problems, Problem) else Problem(None, None, problems)]
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or an empty string."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
