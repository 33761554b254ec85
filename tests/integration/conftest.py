"""Real Kafka and Postgres for these tests: see tests/service_fixtures.py."""

from __future__ import annotations

from tests.service_fixtures import database_url, services, template_database, topics

__all__ = ["database_url", "services", "template_database", "topics"]
