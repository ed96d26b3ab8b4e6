"""What `serve` shows the operator's tools, wired once: the metrics listener (when
metrics_listen is set), the RPC interceptor, the lifecycle log, and systemd's notifications."""

from __future__ import annotations

import logging

import grpc

from adapter.core.config import AgentConfig
from adapter.core.containerizer import Containerizer
from adapter.server import sd_notify
from adapter.server.metrics import LabelProvider, ServiceMetrics, kubernetes_pod_labels, scrape
from adapter.server.metrics_http import MetricsEndpoint
from adapter.server.rpc_observer import RpcObserver
from adapter.server.service_log import log_transition

log = logging.getLogger("containerizer")


class Observability:
    def __init__(
        self,
        config: AgentConfig,
        core: Containerizer,
        labels_of: LabelProvider = kubernetes_pod_labels,
    ) -> None:
        self._listen = config.metrics_listen
        self.metrics = ServiceMetrics() if self._listen else None
        self._endpoint: MetricsEndpoint | None = None
        core.event_hub.observe(log_transition)
        if self.metrics is not None:
            metrics = self.metrics
            core.event_hub.observe(metrics.observe)
            self._endpoint = MetricsEndpoint(lambda: scrape(core, metrics, labels_of))

    async def start(self) -> None:
        """Before recovery: /healthz answers 503 while it runs."""
        if self._endpoint is not None and self._listen is not None:
            address = await self._endpoint.start(self._listen)
            log.info("metrics on http://%s/metrics", address)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [RpcObserver(self.metrics)]

    def recovered(self) -> None:
        if self.metrics is not None:
            self.metrics.recoveries.inc()

    def serving(self) -> None:
        """Recovery done and every socket answering: /healthz is 200, systemd hears READY."""
        if self._endpoint is not None:
            self._endpoint.ready = True
        sd_notify.notify("READY=1")

    async def stopping(self) -> None:
        sd_notify.notify("STOPPING=1")
        if self._endpoint is not None:
            self._endpoint.ready = False
            await self._endpoint.close()
