"""`license-events verify`: every record of the license events topic checked against the
signing keys, as billing would (worker/trust/license_events.py). Reads from the beginning up
to the end the topic had when the read started, in bounded memory; changes nothing."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from worker.kafka.clients import read_until_end
from worker.settings import Settings
from worker.trust.license_events import LicenseEventVerdict, license_event_verdict
from worker.trust.signing import SigningKeys


@dataclass(frozen=True, slots=True)
class RefusedRecord:
    """Where a record that did not verify sits, and why: never its key or value (they name
    customers and subjects)."""

    partition: int
    offset: int
    verdict: LicenseEventVerdict

    def describe(self) -> str:
        return f"partition {self.partition} offset {self.offset}: {self.verdict.value}"


@dataclass(slots=True)
class SignatureCheck:
    counts: Counter[LicenseEventVerdict] = field(default_factory=Counter)
    refused: list[RefusedRecord] = field(default_factory=list)

    @property
    def records(self) -> int:
        return sum(self.counts.values())

    @property
    def invalid(self) -> int:
        return self.records - self.counts[LicenseEventVerdict.VALID]

    def add(self, verdict: LicenseEventVerdict, partition: int, offset: int, show: int) -> None:
        self.counts[verdict] += 1
        if verdict is not LicenseEventVerdict.VALID and len(self.refused) < show:
            self.refused.append(RefusedRecord(partition, offset, verdict))

    def summary(self) -> str:
        return f"{self.records} records: " + ", ".join(
            f"{self.counts[verdict]} {verdict.value}" for verdict in LicenseEventVerdict
        )


async def check_license_event_signatures(
    settings: Settings, keys: SigningKeys, show: int
) -> SignatureCheck:
    """The verdict of every record on the topic; the first `show` refused ones located."""
    check = SignatureCheck()
    async for record in read_until_end(settings, settings.license_events_topic):
        verdict = license_event_verdict(keys, record.key, record.value, record.headers)
        check.add(verdict, record.partition, record.offset, show)
    return check
