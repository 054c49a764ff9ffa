"""The one exception type the CLI turns into a single line on stderr and a non-zero exit."""


class UserError(Exception):
    """A problem the user can fix (bad input, missing data, unreachable store); the message says how."""

    exit_code = 2
