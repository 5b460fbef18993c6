"""How the command line ends on an error: the cause as its last line, and an exit status.

=====  ====================================================================================
 2     usage: an unknown recipe, a bad config key or value, a missing config file, an
       output_dir that holds another run (``UsageError``, ``ConfigError``, ``FileNotFoundError``)
 1     bad input data or a corrupt checkpoint (``DataError``, ``CorruptCheckpointError``)
 130   Ctrl-C (``interrupted at step N; last complete checkpoint: ...``)
=====  ====================================================================================

These errors are the user's to fix, so they print one line, not a traceback. Anything else is a
bug and keeps its traceback, whose last line is the cause.
"""

from __future__ import annotations

import sys

USAGE, FAILURE, INTERRUPTED = 2, 1, 130


class ConfigError(ValueError):
    """A config that names an unknown key, lacks a required one, or cannot be instantiated."""


class UsageError(Exception):
    """A command line that cannot be run as given (unknown recipe, missing ``--config``)."""


def exit_status(prog: str, error: BaseException) -> int:
    """Print ``error``'s one-line cause to stderr and return the exit status; re-raise unknown errors."""
    from lowbit.data.loaders import DataError
    from lowbit.models.checksums import CorruptCheckpointError
    from lowbit.models.gguf import GGUFError

    if isinstance(error, KeyboardInterrupt):
        print(f"{prog}: {error or 'interrupted'}", file=sys.stderr)
        return INTERRUPTED
    failures = getattr(error, "failures", None)  # torchrun's ChildFailedError: each rank printed its cause
    if type(error).__name__ == "ChildFailedError" and isinstance(failures, dict) and failures:
        codes = sorted({f.exitcode for f in failures.values()})
        print(f"{prog}: error: rank(s) {sorted(failures)} of {error.name} exited with status {codes} "
              "(each rank's cause is printed above)", file=sys.stderr)
        return codes[0] if len(codes) == 1 and codes[0] in (USAGE, FAILURE, INTERRUPTED) else FAILURE
    if isinstance(error, UsageError | ConfigError | FileNotFoundError | FileExistsError):
        status = USAGE
    elif isinstance(error, DataError | CorruptCheckpointError | GGUFError):
        status = FAILURE
    else:
        raise error
    print(f"{prog}: error: {error}", file=sys.stderr)
    return status
