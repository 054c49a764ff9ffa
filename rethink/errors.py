"""The exceptions the CLI turns into a single line on stderr and a non-zero exit code."""


class UserError(Exception):
    """A problem the user can fix (bad input, missing data, unreachable store); the message says how."""

    exit_code = 2


class Stopped(Exception):
    """A run stopped on purpose before its end (SIGTERM), its state saved; the message says so."""

    exit_code = 1
