"""A grpc.aio server interceptor: every call's latency by method and status code, and one log
line for every call that ends in an error, with the container id and runtime it named."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from adapter.server.metrics import ServiceMetrics

log = logging.getLogger("containerizer.rpc")


class RpcObserver(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped here
    def __init__(self, metrics: ServiceMetrics | None) -> None:
        self._metrics = metrics
        # method -> (its handler, the handler with the call's end watched): the servicers'
        # handlers are fixed at start, so each is wrapped once, not at every call.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: grpc answers UNIMPLEMENTED itself
            return handler
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        observed = self._observed(handler, method)
        self._wrapped[method] = (handler, observed)
        return observed

    def _observed(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        kind = _kind(handler)
        wrapped = self._wrap(getattr(handler, kind), method.rpartition("/")[2])
        if wrapped is None:
            return handler
        return handler._replace(**{kind: wrapped})

    def _wrap(self, behavior: Any, method: str) -> Any:
        """The same kind of callable (coroutine or async generator) that first registers the
        call's end with its context."""
        if inspect.isasyncgenfunction(behavior):

            async def streamed(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                self._watch(context, method, request)
                async for reply in behavior(request, context):
                    yield reply

            return streamed
        if inspect.iscoroutinefunction(behavior):

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                self._watch(context, method, request)
                return await behavior(request, context)

            return unary
        return None

    def _watch(self, context: grpc.aio.ServicerContext, method: str, request: Any) -> None:
        started = time.perf_counter()
        # A streamed request names its container in its first message, read by the servicer.
        names = {} if inspect.isasyncgen(request) else _named(request)

        def ended(done: grpc.aio.ServicerContext) -> None:
            code = done.code() or grpc.StatusCode.OK
            if self._metrics is not None:
                self._metrics.rpc_seconds.labels(method, code.name).observe(
                    time.perf_counter() - started
                )
            if code is not grpc.StatusCode.OK:
                log.warning(
                    "rpc %s failed: %s: %s",
                    method,
                    code.name,
                    done.details(),
                    extra={"rpc": method, "code": code.name, **names},
                )

        context.add_done_callback(ended)


def _kind(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming:
        return "stream_stream" if handler.response_streaming else "stream_unary"
    return "unary_stream" if handler.response_streaming else "unary_unary"


def _named(request: Any) -> dict[str, str]:
    """The container id and runtime a request names, for the error's log line."""
    names = {}
    for field in ("container_id", "runtime"):
        value = getattr(request, field, "")
        if isinstance(value, str) and value:
            names[field] = value
    return names
