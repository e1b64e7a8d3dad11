"""The one exception type for user mistakes. The CLI prints its message as a single line and exits
non-zero; anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """Bad input from the user: a config key, a path, a name, a data file, a checkpoint."""


def one_line(text: object) -> str:
    """`text` (a message or an exception) with every run of whitespace, newlines included, as one space;
    an exception with no message gives its type's name."""
    joined = " ".join(str(text).split())
    return joined or (type(text).__name__ if isinstance(text, BaseException) else joined)
