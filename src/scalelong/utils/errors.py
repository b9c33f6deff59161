"""Errors that mean "the user asked for something that cannot work" (not a bug in this code).

Entry points catch ``ConfigError`` and print its message as one line (exit status 2), instead
of a traceback; every message names the problem and the fix.
"""


class ConfigError(ValueError):
    """A bad option, name or value in the configuration or the command line."""


class DataError(ConfigError):
    """Missing, corrupt or mis-shaped input data (data sets, checkpoints, weights)."""


class OutputError(ConfigError):
    """An output (checkpoint, result file) cannot be written: full disk, no permission."""


class TrainingDiverged(RuntimeError):
    """Too many steps in a row with a non-finite loss or gradient; the run stops."""


# Exit statuses of ``scalelong-train`` (README "When a process dies"): 0 finished or stopped by
# a signal with a checkpoint saved, 2 a configuration or input error, 3 divergence, 4 another
# process of a multi-process run stopped.
EXIT_CONFIG_ERROR = 2
EXIT_DIVERGED = 3
EXIT_RANK_LOST = 4
