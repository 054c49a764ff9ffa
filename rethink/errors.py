"""The exceptions the CLI turns into a single line on stderr and a non-zero exit code."""


class UserError(Exception):
    """A problem the user can fix (bad input, missing data, unreachable store); the message says how."""

    exit_code = 2
    failure = True  # a run it ends is recorded as failed (see is_failure)


class Stopped(Exception):
    """A run stopped on purpose before its end (SIGTERM, a lost lease, the time budget), its state saved; the
    message says so."""

    exit_code = 1
    failure = False


def is_failure(exc: BaseException) -> bool:
    """Whether an exception that ends a run makes it failed (its error.json written, wherever the run runs: the
    runner, `rethink train` in a pod). Not failures: Ctrl-C, and exceptions marked `failure = False`: a stop on
    purpose (Stopped), a lease another trainer holds, a store that cannot be written (nothing could be recorded
    there)."""
    return isinstance(exc, Exception) and getattr(exc, "failure", True)
