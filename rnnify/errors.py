"""The one exception type the CLI turns into a one-line error."""


class RnnifyError(ValueError):
    """Bad input or a failed step, with a message that names the input and what would be accepted."""
