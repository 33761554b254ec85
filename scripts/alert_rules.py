"""Points every alert's `runbook_url` at where your team publishes docs/operations.md:

    python -m scripts.alert_rules --runbook-base https://wiki.example/ops/license-worker

rewrites deploy/monitoring/alerts.yaml in place (or writes `--output`), each URL being the
base, `#`, and the alert's name in lower case (the anchor of its section). Only the
`runbook_url:` lines change, so comments and layout stay.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from urllib.parse import urlsplit

ALERTS = Path(__file__).resolve().parents[1] / "deploy" / "monitoring" / "alerts.yaml"
DEFAULT_RUNBOOK_BASE = "https://runbooks.example.com/license-worker/operations"
_RUNBOOK_LINE = re.compile(r"^(?P<indent>\s*)runbook_url: \S+#(?P<anchor>[a-z0-9-]+)\s*$")


def with_runbook_base(text: str, base: str) -> str:
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.fragment:
        raise ValueError(f"the runbook base must be an absolute http(s) URL, got {base!r}")
    base = base.rstrip("/")
    lines = []
    for line in text.splitlines(keepends=True):
        match = _RUNBOOK_LINE.match(line)
        lines.append(f"{match['indent']}runbook_url: {base}#{match['anchor']}\n" if match else line)
    return "".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runbook-base", required=True, help="absolute URL of operations.md")
    parser.add_argument("--output", type=Path, default=ALERTS)
    arguments = parser.parse_args()
    rendered = with_runbook_base(ALERTS.read_text(encoding="utf-8"), arguments.runbook_base)
    arguments.output.write_text(rendered, encoding="utf-8")


if __name__ == "__main__":
    main()
