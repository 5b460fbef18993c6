"""How the command line ends on an error: the cause as its last line, and an exit status.

=====  ====================================================================================
 2     usage: an unknown recipe, a bad config key or value, a missing config file, an
       output_dir that holds another run (``UsageError``, ``ConfigError``, ``FileNotFoundError``)
 1     bad input data or a corrupt checkpoint (``DataError``, ``CorruptCheckpointError``)
 130   Ctrl-C (``interrupted at step N; last complete checkpoint: ...``)
=====  ====================================================================================

These errors are the user's to fix, so they print one line, not a traceback. Anything else is a
bug and keeps its traceback, whose last line is the cause. Under torchrun each rank also records its
cause in torchelastic's error file, so that the launcher's last line repeats it.
"""

from __future__ import annotations

import json
import os
import sys
import time

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
    failures = getattr(error, "failures", None)  # torchrun's ChildFailedError
    if type(error).__name__ == "ChildFailedError" and isinstance(failures, dict) and failures:
        return _ranks_failed(prog, error.name, failures)
    if isinstance(error, UsageError | ConfigError | FileNotFoundError | FileExistsError):
        status = USAGE
    elif isinstance(error, DataError | CorruptCheckpointError | GGUFError):
        status = FAILURE
    else:
        raise error
    print(f"{prog}: error: {error}", file=sys.stderr)
    _record_for_launcher(str(error))
    return status


def _record_for_launcher(message: str) -> None:
    """Leave ``message`` in torchelastic's error file (set by torchrun) for the launcher to report."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with open(path, "w") as f:
            # the format of torchelastic's own record_exception (no traceback: the message is the cause)
            json.dump({"message": {"message": message, "extraInfo": {"py_callstack": "",
                                                                     "timestamp": str(int(time.time()))}}}, f)


def _ranks_failed(prog: str, name: str, failures: dict) -> int:
    """The launcher's last line: the cause a failed rank recorded, else which ranks failed and how.

    Ranks that exited on their own come first: the launcher stops the others with SIGTERM.
    """
    ranks = sorted(failures, key=lambda r: (failures[r].exitcode < 0, r))
    recorded = [r for r in ranks if os.path.isfile(getattr(failures[r], "error_file", ""))]
    if not recorded:
        codes = sorted({f.exitcode for f in failures.values()})
        print(f"{prog}: error: rank(s) {sorted(failures)} of {name} exited with status {codes} "
              "(see their output above)", file=sys.stderr)
        return FAILURE
    rank = recorded[0]
    message = failures[rank].message
    print(f"{prog}: error: {message.get('message') if isinstance(message, dict) else message} (rank {rank})",
          file=sys.stderr)
    code = failures[rank].exitcode
    return code if code in (USAGE, FAILURE, INTERRUPTED) else FAILURE
