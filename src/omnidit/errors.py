"""The one exception type for problems with user input.

The CLI prints an ``OmniditError`` as a single line (plus its hint) and exits with code 2; anything
else that escapes is an internal bug and keeps its traceback.
"""

from __future__ import annotations


class OmniditError(Exception):
    """A problem the user can fix: bad input, a missing file, an unknown config key.

    ``hint`` says how to fix it and is printed after the message.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class PromptWarning(UserWarning):
    """A prompt the model will read differently from how it was written: cut by the text encoder, or with
    words the model never saw in training. Shown once per prompt (Python's default warning filter); the
    command line prints it as one ``omnidit: warning: ...`` line."""


def shorten(text: str, limit: int = 60) -> str:
    """``text`` in double quotes for a message, cut to ``limit`` characters with an ellipsis."""
    text = " ".join(text.split())
    return f'"{text if len(text) <= limit else text[:limit - 3] + "..."}"'
