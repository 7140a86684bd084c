"""The error hierarchy. Transport layers map these to status codes at the edge only."""

from __future__ import annotations


class EmbedServeError(Exception):
    """Base class of every error embedserve raises on purpose."""


class ConfigError(EmbedServeError, ValueError):
    """A configuration value is invalid; the message says how to fix it."""


class ImageError(EmbedServeError):
    """One image could not be embedded. It fails alone; the rest of its batch goes on.

    `reason` is a short machine-readable tag (stable, safe as a metric label), `message` the text
    for a person.
    """

    reason: str = "invalid_image"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidImageError(ImageError):
    """The bytes are empty, not an image, truncated or corrupt."""

    reason = "invalid_image"


class UnsupportedImageError(ImageError):
    """The bytes are an image in a format or mode embedserve does not handle."""

    reason = "unsupported_image"


class ImageTooLargeError(ImageError):
    """The image has more pixels than `decode.max_pixels` allows (decompression-bomb guard)."""

    reason = "image_too_large"


class UnreadableImageError(ImageError):
    """The image file could not be read (missing, permissions, I/O error)."""

    reason = "unreadable"


class OverloadedError(EmbedServeError):
    """The batcher's queue is full; the request was refused before anything was enqueued (RESOURCE_EXHAUSTED)."""


class DeadlineExpiredError(EmbedServeError):
    """The caller's deadline passed before its images ran; they were dropped (DEADLINE_EXCEEDED)."""


class EngineUnavailableError(EmbedServeError):
    """The batcher is not running: starting, shutting down, or its engine failed (UNAVAILABLE)."""


class InvalidRequestError(EmbedServeError):
    """The request breaks a limit, names an unknown option or cannot be served as asked (INVALID_ARGUMENT)."""


class ClusterRequestError(InvalidRequestError):
    """A cluster, probe or filter request cannot be served as asked (INVALID_ARGUMENT); the message says why."""


class NotAvailableYetError(EmbedServeError):
    """The request asks for something this server cannot do in its current state (FAILED_PRECONDITION)."""


class NoIndexError(EmbedServeError):
    """This server has no index to read vectors from (UNAVAILABLE)."""


class BatchFailedError(EmbedServeError):
    """One batch failed for an unexpected reason; its requests fail (INTERNAL, with the request id), the server
    keeps serving. The message is generic on purpose: the cause is in the server log, not sent to clients."""


class ModelError(EmbedServeError):
    """A backbone could not be built or loaded."""


class IndexStoreError(EmbedServeError):
    """The vector index refused or failed an operation."""


class CollectionNotFoundError(IndexStoreError, KeyError):
    """No collection has this name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "collection not found"


class KeyNotFoundError(IndexStoreError, KeyError):
    """A collection holds no item with this key."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "key not found"


class CollectionExistsError(IndexStoreError):
    """A collection with this name already exists."""


class InvalidIndexRequestError(IndexStoreError, ValueError):
    """An index request is malformed: a bad collection name, key, filter, vector size or parameter."""


class DataDirLockedError(IndexStoreError):
    """Another process (or store) already uses the data directory."""


class DurabilityError(IndexStoreError):
    """A write could not be made durable (the log could not be written or fsync'd); it was not acknowledged."""
