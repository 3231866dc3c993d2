"""Exit codes of every ftl command (README, 'Exit codes'), and the error that means bad input (exit 2)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # a run or command that failed (a crash, a full disk, an estimate that does not fit)
EXIT_BAD_INPUT = 2  # bad input (config, data, paths), reported before any heavy work
EXIT_STOPPED = 3  # stopped early on request (signal, STOP file, max_minutes); a checkpoint was saved
EXIT_NONFINITE = 4  # a NaN/inf loss or gradient (train.nonfinite); nothing non-finite was saved
EXIT_HUNG = 5  # no step completed within distributed.hang_timeout_minutes: a rank stopped (named in the log)


class ConfigError(Exception):
    """Bad user input: one or more `field: reason` problems, reported together."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))
