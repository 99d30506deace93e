"""probe's errors. Each message is one line naming the key, file or layer at fault.

Exit codes, as pip and most command-line tools use them: 2 for everything the user can fix in the command,
the config or the files given (configuration, run dirs, data, weights); 1 for a run that failed on valid
input (NaN/Inf in training, attributions or synthesis); 130 for Ctrl-C.
"""

from __future__ import annotations

import difflib
from typing import Any


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


class LayerNotFound(ConfigError):
    """A layer name the model does not have; the message lists the valid names."""


def closest(name: str, allowed) -> str:
    """`` (did you mean 'x'?)`` for the closest allowed name, or an empty string."""
    match = difflib.get_close_matches(str(name), [str(a) for a in allowed], n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def check_choice(key: str, value: Any, allowed) -> None:
    allowed = list(allowed)
    if value not in allowed:
        shown = ", ".join(map(str, allowed[:12])) + (", ..." if len(allowed) > 12 else "")
        raise ConfigError(f"{key}: '{value}' is not allowed{closest(value, allowed)}; allowed: {shown}")


def check_range(key: str, value, low=None, high=None, low_open=False) -> None:
    if value is None:
        return
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(f"{key}: {value} is out of range; must be {'>' if low_open else '>='} {low}")
    if high is not None and value > high:
        raise ConfigError(f"{key}: {value} is out of range; must be <= {high}")
