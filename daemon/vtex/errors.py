"""The daemon's errors. No aiohttp or sqlite3 exception crosses a module boundary."""

from __future__ import annotations


class OmsdError(Exception):
    """Base of every error omsd raises on purpose."""


class VtexError(OmsdError):
    """A call to VTEX did not give a usable answer."""

    retryable = True


class VtexUnavailable(VtexError):
    """Network error, timeout or 5xx: VTEX may have done nothing, or something. `code` is
    the result code a 5xx body carried (`EOI000`), if any."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class RateLimited(VtexError):
    """429 after the allowed waits; `retry_after_s` is VTEX's last word."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class VtexRejected(VtexError):
    """VTEX refused the request (4xx); retrying the same request will not help."""

    retryable = False

    def __init__(self, message: str, status: int, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class NotFound(VtexRejected):
    """404: no such order, or no feed configuration for this AppKey."""


class AuthFailed(VtexRejected):
    """401/403: the AppKey/AppToken pair is refused or lacks a permission."""


class BadResponse(VtexError):
    """VTEX answered 2xx with a body omsd cannot read."""
