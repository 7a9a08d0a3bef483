"""OpenTelemetry export of audit events (SPEC §10; needs the ``otel`` extra).

Each `PolicyDecisionEvent` becomes one OpenTelemetry log record: event name
``netproxy.policy_decision``, severity INFO, the event timestamp, and the SPEC §10 fields as
attributes (the same dictionary `to_dict()` gives, so nothing else can leak). Records go
through the SDK's own `LoggerProvider` → `BatchLogRecordProcessor` → exporter (OTLP/HTTP by
default), so the exporting happens on the SDK's thread and the sink itself returns at once.

The SDK is imported only when export is switched on; without the extra that is a
`ConfigError` telling the user what to install.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit, urlunsplit

from .audit import EVENT_NAME, PolicyDecisionEvent
from .config.model import OtelConfig
from .errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import LogRecordExporter

__all__ = ["OtelSink", "logs_endpoint"]

SUPPORTED_PROTOCOLS: Final = ("http/protobuf",)
INSTALL_HINT: Final = "install the otel extra: pip install 'pytest-netproxy[otel]'"
log = logging.getLogger("netproxy.proxy")


def logs_endpoint(endpoint: str) -> str:
    """The OTLP/HTTP logs URL for `endpoint`: a base URL gets ``/v1/logs`` appended."""
    parts = urlsplit(endpoint.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(
            f"otel.endpoint must be an http:// or https:// URL, not {endpoint!r}",
            key="otel.endpoint",
        )
    path = parts.path.rstrip("/")
    if not path.endswith("/v1/logs"):
        path += "/v1/logs"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


class OtelSink:
    """An audit sink that emits OpenTelemetry log records.

    Args:
        config: the ``[otel]`` table (endpoint, protocol).
        exporter: use this exporter instead of OTLP/HTTP (e.g. the SDK's
            ``InMemoryLogExporter`` in tests).

    Raises:
        ConfigError: the OpenTelemetry packages are missing, or the protocol/endpoint is bad.
    """

    def __init__(
        self, config: OtelConfig | None = None, *, exporter: LogRecordExporter | None = None
    ) -> None:
        config = config or OtelConfig(enabled=True)
        try:
            from opentelemetry._logs import SeverityNumber
            from opentelemetry.sdk._logs import LoggerProvider
            from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
            from opentelemetry.sdk.resources import Resource
        except ImportError as exc:
            raise ConfigError(
                f"OpenTelemetry export is enabled but the SDK is missing ({exc.name}); "
                f"{INSTALL_HINT}",
                key="otel",
            ) from None
        if exporter is None:
            exporter = _otlp_exporter(config)
        from . import __version__

        self._severity = SeverityNumber.INFO
        self.provider: LoggerProvider = LoggerProvider(
            resource=Resource.create({"service.name": "netproxy", "service.version": __version__}),
            shutdown_on_exit=False,
        )
        self.provider.add_log_record_processor(BatchLogRecordProcessor(exporter))
        self._logger = self.provider.get_logger("netproxy.audit", __version__)

    def __repr__(self) -> str:
        return "<OtelSink>"

    def __call__(self, event: PolicyDecisionEvent) -> None:
        attributes: dict[str, Any] = event.to_dict()
        self._logger.emit(
            timestamp=int(event.timestamp.timestamp() * 1_000_000) * 1000,
            severity_number=self._severity,
            severity_text="INFO",
            body=EVENT_NAME,
            attributes=attributes,
            event_name=EVENT_NAME,
        )

    def flush(self, timeout_millis: int = 5000) -> bool:
        """Export everything emitted so far."""
        return bool(self.provider.force_flush(timeout_millis))

    def close(self) -> None:
        """Flush and stop the SDK's export thread."""
        self.provider.shutdown()


def _otlp_exporter(config: OtelConfig) -> LogRecordExporter:
    protocol = config.protocol or "http/protobuf"
    if protocol not in SUPPORTED_PROTOCOLS:
        raise ConfigError(
            f"otel.protocol {protocol!r} is not supported; use "
            + " or ".join(repr(p) for p in SUPPORTED_PROTOCOLS),
            key="otel.protocol",
        )
    try:
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    except ImportError as exc:
        raise ConfigError(
            f"OpenTelemetry export is enabled but the OTLP/HTTP exporter is missing "
            f"({exc.name}); {INSTALL_HINT}",
            key="otel",
        ) from None
    if config.endpoint:
        return OTLPLogExporter(endpoint=logs_endpoint(config.endpoint))
    return OTLPLogExporter()  # OTEL_EXPORTER_OTLP_(LOGS_)ENDPOINT or localhost:4318
