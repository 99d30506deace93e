"""probe's errors. Each message is one line naming the key, file or layer at fault.

Exit codes, as pip and most command-line tools use them: 2 for everything the user can fix in the command,
the config or the files given (configuration, run dirs, data, weights); 1 for a run that failed on valid
input (NaN/Inf in training, attributions or synthesis); 130 for Ctrl-C.
"""


class ProbeError(Exception):
    """Base of the errors that the command line prints as one line (no traceback)."""

    exit_code = 1


class ConfigError(ProbeError, ValueError):
    """A bad configuration value or argument: the key and what is allowed."""

    exit_code = 2


class RunDirError(ProbeError):
    """A folder given as a run dir that is not a complete, compatible run dir."""

    exit_code = 2


class DataError(ProbeError):
    """Data that cannot be used as it is (missing files, corrupt images), naming the path."""

    exit_code = 2


class WeightsError(ProbeError):
    """Weights that cannot be used: missing, unreadable, unsafe or of the wrong shapes."""

    exit_code = 2


class NumericalError(ProbeError):
    """NaN or Inf where a finite number was required, with where it happened."""
