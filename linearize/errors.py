"""The one exception type for user mistakes. The CLI prints its message as a single line and exits
non-zero; anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """Bad input from the user: a config key, a path, a name, a data file, a checkpoint."""
