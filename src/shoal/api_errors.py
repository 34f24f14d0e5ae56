"""What a client makes of the master's refusals: `ApiError`, with the HTTP status, the
master's message and the fields at fault.

A refusal for the rate (429 with `Retry-After`) reaches a caller only once its call was
sent again as often as its patience allows (`masters.Patience`): the master did nothing for
any of them. Its message then says who is limited and what to do about it.
"""

from __future__ import annotations

import httpx

from shoal.errors import ShoalError
from shoal.views import ErrorBody, FieldError


class ApiError(ShoalError):
    """The master refused a call: the HTTP status, its message and the fields at fault."""

    def __init__(self, status: int, message: str, fields: list[FieldError]) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.fields = fields


def api_error(response: httpx.Response) -> ApiError:
    """The refusal an error answer stands for."""
    try:
        body = ErrorBody.model_validate(response.json())
    except ValueError:
        body = ErrorBody(error=response.text or response.reason_phrase)
    message = body.error
    if response.status_code == 429 and "Retry-After" in response.headers:
        message = rate_limited(body.error)
    return ApiError(response.status_code, message, body.fields)


def rate_limited(said: str) -> str:
    """What to say of a call the master's rate limit refused every time it was sent."""
    return (
        f"the master is rate limiting this token ({said}) and refused the call each time it was "
        "sent again: wait a while before calling again, or ask an admin to raise the master's "
        "rate_limit (calls a second each token may keep up) and rate_burst"
    )
