"""Errors at the gRPC edge: embedserve errors -> status codes and safe messages, and per-image statuses.

Only our own errors, whose messages are written for the caller, reach a client as text. Anything else is an
internal error: the client gets INTERNAL with a request id, the log gets the traceback.
"""

from __future__ import annotations

import grpc

from service.errors import (
    BatchFailedError,
    CollectionExistsError,
    CollectionNotFoundError,
    ConfigError,
    DataDirLockedError,
    DeadlineExpiredError,
    DurabilityError,
    EmbedServeError,
    EngineUnavailableError,
    ImageError,
    ImageTooLargeError,
    InvalidImageError,
    InvalidIndexRequestError,
    KeyNotFoundError,
    OverloadedError,
    UnreadableImageError,
    UnsupportedImageError,
)


class InvalidRequestError(EmbedServeError):
    """The request breaks a limit or names an unknown option (INVALID_ARGUMENT)."""


class NotAvailableYetError(EmbedServeError):
    """The request asks for something this server cannot do in its current state (FAILED_PRECONDITION)."""


class AuthenticationError(EmbedServeError):
    """The call lacks the bearer token the server wants (UNAUTHENTICATED)."""


_CODES: tuple[tuple[type[EmbedServeError], grpc.StatusCode], ...] = (
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExpiredError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (EngineUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotAvailableYetError, grpc.StatusCode.FAILED_PRECONDITION),
    (AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (ImageError, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (CollectionNotFoundError, grpc.StatusCode.NOT_FOUND),
    (KeyNotFoundError, grpc.StatusCode.NOT_FOUND),
    (CollectionExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (InvalidIndexRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (DurabilityError, grpc.StatusCode.UNAVAILABLE),
    (DataDirLockedError, grpc.StatusCode.UNAVAILABLE),
)

_IMAGE_ERRORS: dict[str, type[ImageError]] = {
    cls.reason: cls for cls in (InvalidImageError, UnsupportedImageError, ImageTooLargeError, UnreadableImageError)
}


def rpc_status(error: BaseException, request_id: str = "") -> tuple[grpc.StatusCode, str]:
    """The status code and the client-safe message for an error raised while handling a call."""
    if not isinstance(error, BatchFailedError):
        for cls, code in _CODES:
            if isinstance(error, cls):
                return code, str(error)
    suffix = f" (request id {request_id})" if request_id else ""
    return grpc.StatusCode.INTERNAL, f"internal server error; the server log has the details{suffix}"


def code_number(code: grpc.StatusCode) -> int:
    """The numeric value of a status code (as in google.rpc.Code)."""
    number: int = code.value[0]
    return number


def image_status(error: ImageError) -> tuple[int, str, str]:
    """(google.rpc code, reason tag, message) of one failed image, for `Result.error`."""
    return code_number(grpc.StatusCode.INVALID_ARGUMENT), error.reason, error.message


def image_error_from_status(code: int, reason: str, message: str) -> ImageError:
    """Rebuild the `ImageError` subclass a server reported for one image (client side)."""
    cls = _IMAGE_ERRORS.get(reason)
    if cls is not None:
        return cls(message)
    error = ImageError(message or f"image failed with code {code}")
    error.reason = reason or "invalid_image"
    return error
