"""The two exceptions every bad input to kvmem turns into."""

from __future__ import annotations


class CubeError(ValueError):
    """A cube (or an argument about cubes) is unusable: the message says what is wrong and what to do."""


class FingerprintMismatch(CubeError):
    """A cube was built for another model, tokenizer or adapter than the one it is used with.

    Attributes:
        fields: the fingerprint fields that differ, e.g. ``["weights", "adapter"]``.
    """

    def __init__(self, message: str, fields: list[str] | None = None):
        super().__init__(message)
        self.fields = list(fields or [])
