"""Wire contracts of the license telemetry service, as pydantic models.

Other teams read this package: it holds the message formats and nothing else.
`python -m schemas.export DIR` writes them as JSON Schema files.

Besides the body, a deployment that verifies signatures (AGENT_SIGNING_KEYS_FILE,
CONSOLE_SIGNING_KEYS_FILE) expects two Kafka headers on every agent and console message:
`sig.key_id` and `sig.hmac` (HMAC-SHA256, lowercase hex). What they sign, and a reference
signer, are in worker/trust/signing.py; the README's "Message signatures" has the details.
"""

from __future__ import annotations

from schemas.agent_events import (
    AGENT_EVENT_ADAPTER,
    AgentEvent,
    DeviceKind,
    Heartbeat,
    Install,
    Uninstall,
    UserProfile,
)
from schemas.license_events import LICENSE_EVENT_ADAPTER, LicenseEvent

__all__ = [
    "AGENT_EVENT_ADAPTER",
    "LICENSE_EVENT_ADAPTER",
    "AgentEvent",
    "DeviceKind",
    "Heartbeat",
    "Install",
    "LicenseEvent",
    "Uninstall",
    "UserProfile",
]
