"""Errors a user sees as one line and a non-zero exit status."""

import click


class UserError(click.ClickException):
    """A problem the user can fix: bad option, unreachable address, bad model file.

    The command line prints ``Error: <message>`` and exits with status 1, no
    traceback.
    """
