"""Errors a user sees as one line and a non-zero exit status."""


class UserError(Exception):
    """A problem the user can fix: bad option, unreachable address, bad model file.

    The command line turns it into ``Error: <message>`` and exit status 1, with no
    traceback; the library raises it without knowing of any command line.
    """


class BundleError(UserError):
    """A model bundle that cannot be served; the message says why, on one line."""
