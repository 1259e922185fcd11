"""The one exception type that the CLI turns into a short message and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user (a path, a flag, a checkpoint, a profile): say what and why."""
