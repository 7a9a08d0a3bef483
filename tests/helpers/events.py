"""The SPEC §10 event contract, written out once for the tests that check it."""

from __future__ import annotations

import re

REQUIRED = {
    "event.name",
    "event.timestamp",
    "network.policy.scope",
    "network.policy.decision",
    "network.policy.source",
    "network.policy.reason",
    "network.transport.protocol",
    "server.address",
    "server.port",
    "http.request.method",
    "client.address",
    "network.policy.override",
}
OPTIONAL = {"netproxy.test_id", "conversation.id", "app.version", "user.account_id"}
RFC3339_MS_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
