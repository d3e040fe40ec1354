"""The one exception type that reaches the user as a message, never as a traceback."""


class UserError(Exception):
    """Bad input or environment: the message names the file or option and what to do."""
