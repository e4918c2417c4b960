"""The one error type users see."""


class CompileError(Exception):
    """A compile could not be done; the message is the one line the CLI prints."""
