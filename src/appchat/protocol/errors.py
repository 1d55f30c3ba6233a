"""One error hierarchy: each error has a stable wire code and a human message."""

from __future__ import annotations


class AppError(Exception):
    """An error a client sees as ``{"code": ..., "message": ...}``."""

    code = "internal"
    default_message = "internal server error"

    def __init__(self, message: str | None = None) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)


class BadRequest(AppError):
    code = "bad_request"
    default_message = "malformed request"


class Unauthorized(AppError):
    code = "unauthorized"
    default_message = "invalid credentials"


class Forbidden(AppError):
    code = "forbidden"
    default_message = "not allowed"


class NotFound(AppError):
    code = "not_found"
    default_message = "not found"


class TooLarge(AppError):
    code = "too_large"
    default_message = "the upload is too large"


class UnsupportedType(AppError):
    code = "unsupported_type"
    default_message = "the file is not a PNG, JPEG, WebP or GIF image"


class RateLimited(AppError):
    code = "rate_limited"
    default_message = "too many events, slow down"


class UnknownEvent(AppError):
    code = "unknown_event"
    default_message = "unknown event"


class Unavailable(AppError):
    code = "unavailable"
    default_message = "service temporarily unavailable, try again"


class Internal(AppError):
    code = "internal"
    default_message = "internal server error"


class ConfigError(Exception):
    """A setting that makes the server refuse to start; the message is shown as is."""
