"""Our errors as gRPC statuses, by class, once for every servicer (our API, the images API, the
CRI): no Python traceback crosses an API."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from adapter.core import errors

log = logging.getLogger(__name__)

STATUS_BY_ERROR: list[tuple[type[Exception], grpc.StatusCode]] = [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.LaunchFailed, grpc.StatusCode.INTERNAL),
    (errors.ContainerizerError, grpc.StatusCode.INTERNAL),
]

Reply = TypeVar("Reply")


def status_for(exc: Exception) -> grpc.StatusCode:
    for error_class, code in STATUS_BY_ERROR:
        if isinstance(exc, error_class):
            return code
    return grpc.StatusCode.INTERNAL


def mapped_errors(
    method: Callable[..., Awaitable[Reply]],
) -> Callable[..., Awaitable[Reply]]:
    """Turn our errors into gRPC statuses; log and hide anything unexpected."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Reply:
        try:
            return await method(self, request, context)
        except errors.ContainerizerError as exc:
            await context.abort(status_for(exc), str(exc))
        except Exception as exc:
            log.exception("%s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")
        raise AssertionError("unreachable: context.abort raises")

    return wrapper


Message = TypeVar("Message")


def mapped_stream_errors(
    method: Callable[..., AsyncIterator[Message]],
) -> Callable[..., AsyncIterator[Message]]:
    """`mapped_errors` for streaming RPCs (the request may be a stream too)."""

    @functools.wraps(method)
    async def wrapper(
        self: Any, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Message]:
        try:
            async for message in method(self, request, context):
                yield message
        except errors.ContainerizerError as exc:
            await context.abort(status_for(exc), str(exc))
        except Exception as exc:
            log.exception("%s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")

    return wrapper
