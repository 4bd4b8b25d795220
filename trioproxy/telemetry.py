"""What the proxy reports about itself: one log line per turn, and Prometheus metrics.

Counts live where they happen (the proxy's turns and retries, the registry's evictions); this
module adds what only a finished turn knows (outcome, cached tokens, bytes a suffix saved) and the
two latency histograms, and exposes all of it at scrape time through a collector of its own, so
nothing is counted twice and `/healthz` and `/metrics` never disagree.

The turn's log line carries ids, a hash prefix of the pool key, sizes and outcome; never a header
value, a credential or any content.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import trio
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from trioproxy.events import response_object

if TYPE_CHECKING:
    from trioproxy.proxy import Proxy
    from trioproxy.registry import Registry
    from trioproxy.turn import Turn, TurnEnd

turn_log = logging.getLogger("trioproxy.turn")

# Latency buckets in seconds: a local fake answers in milliseconds, a real model in seconds.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_REQUEST_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


def request_id(headers: list[tuple[str, str]]) -> str:
    """The client's request id when it sent a sane one (Codex sends `x-client-request-id`),
    else a fresh one: it ties the client's request to the turn's log line."""
    for name in ("x-request-id", "x-client-request-id"):
        for key, value in headers:
            if key == name and _REQUEST_ID.fullmatch(value):
                return value
    return f"req_{uuid.uuid4().hex}"


def cached_tokens(end: TurnEnd) -> tuple[int, int]:
    """(input tokens, cached input tokens) from the final response's usage, if it has one."""
    response = response_object(end.event) if end.event is not None else None
    usage = response.get("usage") if response is not None else None
    if not isinstance(usage, dict):
        return 0, 0
    details = usage.get("input_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0
    total = usage.get("input_tokens")
    return (total if isinstance(total, int) else 0), (cached if isinstance(cached, int) else 0)


class Carrier(Protocol):
    """What carried a turn: an upstream socket, or an HTTP exchange."""

    @property
    def id(self) -> int: ...
    @property
    def key(self) -> str | None: ...
    @property
    def one_turn(self) -> bool: ...


class Telemetry:
    """Per-app metrics registry (tests run several apps in one process) and the turn log."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.outcomes: Counter[str] = Counter()
        self.transports: Counter[str] = Counter()
        self.saved_bytes = 0
        self.wire_bytes = 0
        self.input_tokens = 0
        self.cached_tokens = 0
        self.refused_upgrades = 0
        self.websocket_clients = 0  # client WebSockets open now
        self.clients_closed: Counter[str] = Counter()  # client WebSockets closed by the proxy
        self.clients: Counter[str] = Counter()  # turns by how they came in
        self.handshake = Histogram(
            "trioproxy_upstream_handshake_seconds",
            "Time to open an upstream WebSocket (TCP, TLS and upgrade).",
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.first_event = Histogram(
            "trioproxy_first_event_seconds",
            "Time from sending a turn upstream to its first event.",
            buckets=_BUCKETS,
            registry=self.registry,
        )

    def watch(self, proxy: Proxy, registry: Registry, refreshes: Callable[[], int]) -> None:
        """Expose the counts kept by the proxy and the pool at scrape time."""
        self.registry.register(_Collector(self, proxy, registry, refreshes))

    def scrape(self) -> bytes:
        return generate_latest(self.registry)

    def turn_ended(self, conn: Carrier, turn: Turn, end: TurnEnd) -> None:
        """Count a finished turn and write its one log line."""
        outcome = end.kind
        self.outcomes[outcome] += 1
        self.transports[turn.transport] += 1
        self.clients[turn.client] += 1
        self.wire_bytes += turn.wire_bytes
        if turn.plan.mode == "suffix" and turn.request_bytes > turn.sent_bytes:
            self.saved_bytes += turn.request_bytes - turn.sent_bytes
        total, cached = cached_tokens(end)
        self.input_tokens += total
        self.cached_tokens += cached
        now = trio.current_time()
        fields: dict[str, Any] = {
            "turn_id": turn.turn_id,
            "request_id": turn.request_id,
            "session": _session(conn, turn),
            "scope": turn.tenant,
            "channel": turn.channel,
            "socket": conn.id,
            "transport": turn.transport,
            "client": turn.client,
            "mode": "one_turn" if conn.one_turn else turn.plan.mode,
            "socket_found": turn.placement,
            "items": turn.plan.new_items,
            "request_bytes": turn.request_bytes,
            "sent_bytes": turn.sent_bytes,
            "wire_bytes": turn.wire_bytes,
            "outcome": outcome,
            "code": end.error.code if end.error is not None else None,
            "input_tokens": total,
            "cached_tokens": cached,
            "duration_ms": round((now - turn.started) * 1000, 1),
            "first_event_ms": (
                round((turn.first_event_at - turn.started) * 1000, 1)
                if turn.first_event_at is not None
                else None
            ),
        }
        # A turn that did not complete is what an operator looks for: not buried at info.
        turn_log.log(
            logging.INFO if outcome == "completed" else logging.WARNING,
            "turn %s socket=#%d mode=%s sent=%dB outcome=%s",
            turn.turn_id,
            conn.id,
            fields["mode"],
            turn.sent_bytes,
            outcome,
            extra={"fields": fields},
        )


class _Collector(Collector):
    def __init__(
        self,
        telemetry: Telemetry,
        proxy: Proxy,
        registry: Registry,
        refreshes: Callable[[], int],
    ) -> None:
        self._t = telemetry
        self._proxy = proxy
        self._registry = registry
        self._refreshes = refreshes

    def collect(self) -> Iterator[Metric]:
        t, proxy, registry = self._t, self._proxy, self._registry
        yield _gauge(
            "trioproxy_pooled_sockets", "Upstream sockets kept for sessions.", registry.pooled
        )
        yield _gauge("trioproxy_idle_sockets", "Pooled sockets waiting for a turn.", registry.idle)
        yield _gauge(
            "trioproxy_live_sockets", "Upstream socket tasks, pooled or one-turn.", registry.live
        )
        yield _gauge(
            "trioproxy_buffered_events",
            "Events waiting for slow clients (each turn's buffer is bounded).",
            registry.buffered_events,
        )
        yield _labelled("trioproxy_turns", "Turns by how they went upstream.", "mode", proxy.turns)
        yield _labelled(
            "trioproxy_turn_placements",
            "WebSocket turns by how they found their socket: header, cache_key, inferred, "
            "warm, new, lane (beside a WebSocket client's others), fork (lanes on).",
            "how",
            proxy.placements,
        )
        yield _labelled(
            "trioproxy_turn_transport",
            "Turns by the transport that served them.",
            "transport",
            t.transports,
        )
        yield _labelled(
            "trioproxy_turn_clients",
            "Turns by how the client sent them: http-in (POST) or websocket-in.",
            "client",
            t.clients,
        )
        yield _gauge(
            "trioproxy_websocket_clients", "Client WebSockets open now.", t.websocket_clients
        )
        yield _labelled(
            "trioproxy_websocket_clients_closed",
            "Client WebSockets the proxy closed, by reason (idle, a bound, a fault).",
            "reason",
            t.clients_closed,
        )
        yield _labelled(
            "trioproxy_turn_outcomes", "Finished turns by how they ended.", "outcome", t.outcomes
        )
        yield _labelled(
            "trioproxy_evictions", "Pooled sockets closed, by reason.", "reason", registry.evictions
        )
        # Lanes (README "Lanes"): sessions seated on shared sockets, and what moved them.
        yield _gauge(
            "trioproxy_lane_seats",
            "Sessions seated on lanes of shared upstream sockets (lanes on).",
            len(registry.lanes.sessions),
        )
        yield _counter(
            "trioproxy_lane_forks",
            "Requests on a busy session that ran on another lane of its socket (since start).",
            registry.lanes.forks,
        )
        yield _labelled(
            "trioproxy_lane_seats_moved",
            "Seats given up, by why (their sessions start afresh on their next turn).",
            "reason",
            registry.lanes.moved,
        )
        yield _labelled(
            "trioproxy_retries",
            "Transparent retries on a fresh socket, by cause.",
            "cause",
            proxy.retries,
        )
        yield _counter("trioproxy_sockets_opened", "Upstream sockets opened.", registry.opened)
        yield _counter(
            "trioproxy_request_bytes",
            "Request body bytes received from clients.",
            proxy.request_bytes,
        )
        yield _counter(
            "trioproxy_upstream_bytes", "Bytes of turns sent upstream.", proxy.upstream_bytes
        )
        yield _counter(
            "trioproxy_upstream_wire_bytes",
            "Bytes of turns on the upstream wire: frames after permessage-deflate, HTTP bodies.",
            t.wire_bytes,
        )
        yield _counter(
            "trioproxy_suffix_saved_bytes",
            "Bytes suffix turns did not send: the client's request size minus what went upstream.",
            t.saved_bytes,
        )
        yield _counter("trioproxy_input_tokens", "Input tokens reported upstream.", t.input_tokens)
        yield _counter(
            "trioproxy_cached_tokens", "Cached input tokens reported upstream.", t.cached_tokens
        )
        yield _counter(
            "trioproxy_token_refreshes", "Held ChatGPT login refreshes.", self._refreshes()
        )
        yield _counter(
            "trioproxy_websocket_upgrades_refused",
            "Downstream WebSocket upgrades answered 426.",
            t.refused_upgrades,
        )


def _gauge(name: str, doc: str, value: float) -> Metric:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> Metric:
    return CounterMetricFamily(name, doc, value=value)


def _labelled(name: str, doc: str, label: str, counts: Counter[str]) -> Metric:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in sorted(counts.items()):
        family.add_metric([key], value)
    return family


def _session(carrier: Carrier, turn: Turn) -> str | None:
    """The session a log line names: the seat's with lanes on (a shared socket's key names
    no session), else the socket's."""
    key = turn.seat.key if turn.seat is not None and turn.seat.key else carrier.key
    return key[:12] if key else None
