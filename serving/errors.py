"""Errors a user can cause, each with its HTTP status and OpenAI error type.

They are raised anywhere in the request path (router, cache, LLM server) and turned into an
OpenAI-style error body by the router. They pickle, so they cross Ray handles intact.
"""

from __future__ import annotations

from typing import Optional


class ServingError(Exception):
    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 retry_after: Optional[float] = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def __reduce__(self):
        return (type(self), (self.message, self.param, self.code, self.retry_after))

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type,
                          "param": self.param, "code": self.code}}


class InvalidRequestError(ServingError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    def __init__(self, message: str, param: Optional[str] = "messages", code: Optional[str] = "context_length_exceeded",
                 retry_after: Optional[float] = None):
        super().__init__(message, param, code, retry_after)


class ModelNotFoundError(ServingError):
    status_code = 404
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: Optional[str] = "model", code: Optional[str] = "model_not_found",
                 retry_after: Optional[float] = None):
        super().__init__(message, param, code, retry_after)


class OverloadedError(ServingError):
    """The server cannot take more work now; the client should retry after `retry_after` seconds."""

    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str = "server overloaded, retry later", param: Optional[str] = None,
                 code: Optional[str] = "overloaded", retry_after: Optional[float] = 1.0):
        super().__init__(message, param, code, retry_after)


class UnavailableError(ServingError):
    status_code = 503
    error_type = "service_unavailable"

    def __init__(self, message: str = "service unavailable", param: Optional[str] = None,
                 code: Optional[str] = "unavailable", retry_after: Optional[float] = 5.0):
        super().__init__(message, param, code, retry_after)


class AuthenticationError(ServingError):
    """A missing, malformed or unknown API key (OpenAI answers these with 401 and this type and code)."""

    status_code = 401
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = "invalid_api_key",
                 retry_after: Optional[float] = None):
        super().__init__(message, param, code, retry_after)


class RequestTooLargeError(InvalidRequestError):
    """A request body over the configured size; it is refused before it is parsed."""

    status_code = 413

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = "request_too_large",
                 retry_after: Optional[float] = None):
        super().__init__(message, param, code, retry_after)
