"""Writes every wire contract as a JSON Schema file: `python -m schemas.export DIR`."""

from __future__ import annotations

import sys
from pathlib import Path

import orjson
from pydantic import TypeAdapter

from schemas.admin_events import ADMIN_EVENT_ADAPTER
from schemas.agent_events import AGENT_EVENT_ADAPTER
from schemas.json_schema import contract_json_schema
from schemas.license_events import LICENSE_EVENT_ADAPTER

CONTRACTS: dict[str, TypeAdapter[object]] = {
    "agent-event.v1.schema.json": AGENT_EVENT_ADAPTER,  # type: ignore[dict-item]
    "admin-event.v1.schema.json": ADMIN_EVENT_ADAPTER,  # type: ignore[dict-item]
    "license-event.v1.schema.json": LICENSE_EVENT_ADAPTER,  # type: ignore[dict-item]
}


def export_json_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, adapter in CONTRACTS.items():
        path = directory / file_name
        schema = contract_json_schema(file_name, adapter)
        path.write_bytes(orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
        written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("schemas/json")
    for written_path in export_json_schemas(target):
        print(written_path)
