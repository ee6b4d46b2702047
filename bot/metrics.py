"""Prometheus metrics (served at GET /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter("breakglass_requests_total", "Access requests by outcome",
                   ["outcome"], registry=REGISTRY)
TOKENS_ISSUED = Counter("breakglass_tokens_issued_total", "Tokens issued", ["scope"],
                        registry=REGISTRY)
REFUSALS = Counter("breakglass_refusals_total", "Refusals by reason", ["code"],
                   registry=REGISTRY)
INTROSPECTIONS = Counter("breakglass_introspections_total", "Introspections by result",
                         ["active"], registry=REGISTRY)
CLIENT_AUTH_FAILURES = Counter(
    "breakglass_client_auth_failures_total",
    "Failed client authentications on /oauth2/introspect and /oauth2/revoke, by reason "
    "(malformed, unknown_client, bad_secret, throttled)", ["reason"], registry=REGISTRY)
OUTBOX_SENT = Counter("breakglass_outbox_sent_total", "Slack events delivered", ["kind"],
                      registry=REGISTRY)
OUTBOX_RETRIES = Counter("breakglass_outbox_retries_total", "Slack deliveries retried",
                         ["kind"], registry=REGISTRY)
OUTBOX_DEAD = Counter("breakglass_outbox_dead_letters_total",
                      "Slack events dead-lettered after their last attempt", ["kind"],
                      registry=REGISTRY)
OUTBOX_PENDING = Gauge("breakglass_outbox_pending", "Slack events waiting for delivery",
                       registry=REGISTRY)
SLACK_ACK_SECONDS = Histogram("breakglass_slack_ack_seconds",
                              "Time to answer a Slack request", registry=REGISTRY,
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 3))
TIME_TO_ACCESS = Histogram("breakglass_time_to_access_seconds",
                           "From the /breakglass command to the token revealed (or delivered)",
                           ["kind"], registry=REGISTRY,
                           buckets=(15, 30, 60, 120, 180, 300, 600, 900, 1800, 3600, 7200))
for _kind in ("real", "drill"):
    TIME_TO_ACCESS.labels(kind=_kind)  # both series exist from the start
