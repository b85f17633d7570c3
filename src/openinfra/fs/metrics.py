"""Prometheus metrics per service process: RPC counts and latency, bytes, chunk and target gauges.

Each service calls :func:`start_metrics` once with its name; the endpoint serves
``/metrics`` over HTTP on 127.0.0.1 at the given port (0 = any free port).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ServiceMetrics", "start_metrics"]


@dataclass
class ServiceMetrics:
    requests: object
    latency: object
    bytes: object
    gauge: object
    address: str = ""
    _children: dict = field(default_factory=dict, repr=False)

    def on_request(self, method: str, status: str, seconds: float) -> None:
        # Label lookups cost microseconds each; cache the children (methods x statuses is small).
        key = (method, status)
        pair = self._children.get(key)
        if pair is None:
            if len(self._children) > 10_000:  # garbage method names from bad clients: stop caching
                self._children.clear()
            pair = self._children[key] = (self.requests.labels(method=method, status=status),
                                          self.latency.labels(method=method))
        pair[0].inc()
        pair[1].observe(seconds)


def start_metrics(service: str, host: str = "127.0.0.1", port: int | None = 0) -> ServiceMetrics:
    """Create the metrics and, when ``port`` is not None, serve them; returns the handles."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

    reg = CollectorRegistry()
    labels = {"service": service}
    m = ServiceMetrics(
        requests=Counter("openinfra_fs_rpc_requests", "RPC requests served", ["method", "status"], registry=reg),
        latency=Histogram("openinfra_fs_rpc_seconds", "RPC handling time in seconds", ["method"], registry=reg,
                          buckets=(1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1, 5)),
        bytes=Counter("openinfra_fs_bytes", "payload bytes moved", ["direction"], registry=reg),
        gauge=Gauge("openinfra_fs_state", "service state values (targets by state, chunks, ...)", ["name"], registry=reg),
    )
    Gauge("openinfra_fs_service_info", "which service this is", ["service"], registry=reg).labels(**labels).set(1)
    if port is not None:
        server, _thread = start_http_server(port, addr=host, registry=reg)
        m.address = f"{host}:{server.server_port}"
    return m
