"""User-facing errors: one clear line (what, where, how to fix), exit code 2."""

from __future__ import annotations


class FtedgeError(Exception):
    """An error caused by the user's input or environment, shown as one line."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = " ".join(self.message.split())
        if self.hint:
            text += f" (fix: {' '.join(self.hint.split())})"
        return text


class StageMissingError(FtedgeError):
    """A stage's input (a predecessor's output) is not in the run."""


class GateFailedError(FtedgeError):
    """An artifact failed its parity gate."""

    exit_code = 3
