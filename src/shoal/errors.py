"""The error types of shoal.

`ShoalError` is the one root. Bad input is a `SpecError` carrying the field that is
wrong and why; an API client sees it as a 4xx with those two parts. Expected scheduling
outcomes ("unschedulable", "stale plan") are values with a reason, not exceptions.
"""

from __future__ import annotations


class ShoalError(Exception):
    """Root of every error shoal raises on purpose."""


class SpecError(ShoalError):
    """Input that can never be accepted: names the field and the reason."""

    def __init__(self, field: str, reason: str, status: int = 422) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
        self.status = status


class NotFound(ShoalError):
    """A job, task or node that does not exist (or that the caller may not see)."""


class Forbidden(ShoalError):
    """The caller's role or ownership does not allow this."""
