"""The one error type of conversion: bad user input, reported as one line with exit code 2."""

from __future__ import annotations

__all__ = ["ConvertError"]


class ConvertError(ValueError):
    """The input cannot be converted faithfully; the message names the field, tensor or file."""
