"""Real Kafka and Postgres for the fault suite: see tests/service_fixtures.py."""

from __future__ import annotations

from tests.service_fixtures import services

__all__ = ["services"]
