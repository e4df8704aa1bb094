"""The one exception type for mistakes a user can fix (bad file, bad option, bad config)."""


class TinyLMError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits with code 2.

    Programming errors are any other exception and keep their traceback.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        message = super().__str__()
        return f"{message} ({self.hint})" if self.hint else message
