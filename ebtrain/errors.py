"""The one exception type that means "the user asked for something we cannot do"."""


class UserError(Exception):
    """Bad input or missing data: the CLI prints the message as one line and exits with code 2."""
