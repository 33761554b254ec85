"""Wire contracts of the license telemetry service, as pydantic models.

Other teams read this package: it holds the message formats and nothing else.
`python -m schemas.export DIR` writes them as JSON Schema files.
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
