"""Error types the user sees. The CLI prints their message and exits non-zero; never a traceback."""


class DeltatuneError(Exception):
    """Base class: the message says what is wrong, where, and what to do next."""

    exit_code = 2


class ConfigError(DeltatuneError):
    """The configuration has one or more problems (all are listed in the message)."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


class DataError(DeltatuneError):
    """A data file is missing, unreadable or does not fit the task."""


class AssetError(DeltatuneError):
    """A packaged model or data set is not installed or could not be prepared."""


class CannotMerge(DeltatuneError):
    """The method's delta cannot be folded into the base weights."""


class Stopped(Exception):
    """A callback ended a run early on purpose (e.g. the tuner pruned a trial): the run directory and the
    registry record ``status`` (one of registry_db.STATUSES), not a failure."""

    def __init__(self, message: str, status: str):
        super().__init__(message)
        self.status = status


class RunError(DeltatuneError):
    """A run directory is missing, incomplete or from an incompatible version."""


class NonFiniteError(RunError):
    """Training produced a NaN or infinite loss, gradient or evaluation (``train.on_nonfinite``)."""


class OutputError(DeltatuneError):
    """An output path is taken: deltatune never deletes or overwrites what it did not write."""


class ArgumentError(DeltatuneError):
    """A command-line argument is out of range or not valid text."""


class ExportError(DeltatuneError):
    """A run cannot be exported in the asked format (the message says why and which format can), or the
    runtime that will load the export does not give the run's answers (the parity check's figures)."""
