"""The licensing rules, as pure functions: facts and `now` in, the licenses that should be
held (and the changes that get there) out. No I/O; the caller reads and writes.

The rules are those of the contract (`docs/licensing.md` states each one):
- a device counts when it is protected and has signalled within the release window;
- a user holds a license while at least one of their devices counts;
- the user license covers one business and two personal counting devices; each further
  counting device is a device license (`over_allowance`); the covered ones are the earliest
  first seen of each kind (ties by device id), so a newly added device is the one that
  takes the extra license and the choice never changes the count;
- a counting device without a user is a device license (`unassigned`);
- under the `device` license model every counting device is a device license and users are
  not counted;
- an inactive customer holds no license: inactivation releases them all
  (`customer_inactivated`, at the inactivation), and signals while inactive license nothing;
- every license is attributed to a subscription package (`worker/licensing/subscription_rules.py`).
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

COVERED_PER_KIND = {"business": 1, "personal": 2}
DEFAULT_KIND = "business"


class SubjectType(StrEnum):
    USER = "user"
    DEVICE = "device"


class Basis(StrEnum):
    """Why a subject holds a license."""

    USER = "user"
    UNASSIGNED = "unassigned"
    OVER_ALLOWANCE = "over_allowance"
    DEVICE_MODEL = "device_model"


class Reason(StrEnum):
    FIRST_SIGNAL = "first_signal"
    REACTIVATED = "reactivated"
    INACTIVE = "inactive_30d"
    UNINSTALLED = "uninstalled"
    COVERED_BY_USER = "covered_by_user"
    LICENSE_MODEL_CHANGED = "license_model_changed"
    NO_DEVICES = "no_devices"
    CUSTOMER_INACTIVATED = "customer_inactivated"
    RETENTION = "retention_90d"
    ERASURE_REQUESTED = "erasure_requested"


class ChangeKind(StrEnum):
    ALLOCATED = "allocated"
    RELEASED = "released"
    BASIS_CHANGED = "basis_changed"
    PACKAGE_CHANGED = "package_changed"


Subject = tuple[SubjectType, str]


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    device_id: str
    user_id: str | None
    kind: str | None
    protected: bool
    first_seen_at: datetime
    last_seen_at: datetime
    last_uninstalled_at: datetime | None = None
    last_present_at: datetime | None = None

    @property
    def effective_kind(self) -> str:
        return self.kind or DEFAULT_KIND


@dataclass(frozen=True, slots=True)
class HeldLicense:
    """A license row as stored: active, or released (then `basis` is the last one held).
    `event_sequence` counts the subject's license events so far (allocations and releases)."""

    active: bool
    basis: Basis
    package: str | None = None
    event_sequence: int = 0


@dataclass(frozen=True, slots=True)
class CustomerTerms:
    """What a customer's licenses depend on besides its devices."""

    license_model: str = "user"
    active: bool = True
    # When the customer was last inactivated or reactivated (None: never).
    status_changed_at: datetime | None = None
    default_package: str | None = None
    # Users whose groups give them a package; everyone else gets the default.
    user_packages: Mapping[str, str] = field(default_factory=dict)

    def package_of_user(self, user_id: str) -> str | None:
        return self.user_packages.get(user_id, self.default_package)


@dataclass(frozen=True, slots=True)
class LicenseChange:
    kind: ChangeKind
    subject_type: SubjectType
    subject_id: str
    basis: Basis
    reason: Reason | None
    effective_at: datetime
    package: str | None = None
    # The subject's license event this change announces: 1 for its first, one more for each
    # next (0: a change billing is not told of, such as a new basis).
    sequence: int = 0

    @property
    def subject(self) -> Subject:
        return (self.subject_type, self.subject_id)


def counts(device: DeviceFacts, now: datetime, window: timedelta) -> bool:
    """Protected and heard from within the window: 30 days of silence end the count."""
    return device.protected and now - device.last_seen_at < window


def split_allowance(devices: Iterable[DeviceFacts]) -> tuple[list[DeviceFacts], list[DeviceFacts]]:
    """(covered, over allowance) among one user's counting devices."""
    covered: list[DeviceFacts] = []
    over: list[DeviceFacts] = []
    taken: dict[str, int] = defaultdict(int)
    for device in sorted(devices, key=lambda d: (d.first_seen_at, d.device_id)):
        kind = device.effective_kind
        if taken[kind] < COVERED_PER_KIND[kind]:
            taken[kind] += 1
            covered.append(device)
        else:
            over.append(device)
    return covered, over


def desired_licenses(
    devices: Iterable[DeviceFacts],
    terms: CustomerTerms | str,
    now: datetime,
    window: timedelta,
) -> dict[Subject, Basis]:
    """The licenses a set of devices calls for. Pass whole users: a user's allowance is
    decided from all of their devices. A license model name stands for an active customer
    without subscriptions."""
    terms = _terms(terms)
    if not terms.active:
        return {}
    license_model = terms.license_model
    counting = [device for device in devices if counts(device, now, window)]
    wanted: dict[Subject, Basis] = {}
    if license_model == "device":
        for device in counting:
            wanted[(SubjectType.DEVICE, device.device_id)] = Basis.DEVICE_MODEL
        return wanted
    by_user: dict[str, list[DeviceFacts]] = defaultdict(list)
    for device in counting:
        if device.user_id is None:
            wanted[(SubjectType.DEVICE, device.device_id)] = Basis.UNASSIGNED
        else:
            by_user[device.user_id].append(device)
    for user_id, user_devices in by_user.items():
        wanted[(SubjectType.USER, user_id)] = Basis.USER
        for device in split_allowance(user_devices)[1]:
            wanted[(SubjectType.DEVICE, device.device_id)] = Basis.OVER_ALLOWANCE
    return wanted


def attributed_packages(
    wanted: Mapping[Subject, Basis], devices: Iterable[DeviceFacts], terms: CustomerTerms
) -> dict[Subject, str | None]:
    """The package of each wanted license: a user's own; an over-allowance device's user's;
    the customer's default for every other device license."""
    users_of_devices = {device.device_id: device.user_id for device in devices}
    packages: dict[Subject, str | None] = {}
    for (subject_type, subject_id), basis in wanted.items():
        user_id = subject_id if subject_type is SubjectType.USER else None
        if basis is Basis.OVER_ALLOWANCE:
            user_id = users_of_devices.get(subject_id)
        package = terms.default_package if user_id is None else terms.package_of_user(user_id)
        packages[(subject_type, subject_id)] = package
    return packages


def license_changes(
    devices: Sequence[DeviceFacts],
    held: Mapping[Subject, HeldLicense],
    terms: CustomerTerms | str,
    now: datetime,
    window: timedelta,
) -> list[LicenseChange]:
    """What must change so that the held licenses match the rules. `devices` are every
    device of every user involved; `held` holds every stored license row of those subjects,
    active or released (a released row makes a new allocation a reactivation)."""
    terms = _terms(terms)
    wanted = desired_licenses(devices, terms, now, window)
    packages = attributed_packages(wanted, devices, terms)
    facts = _SubjectFacts(devices, now, window, terms)
    changes = []
    for subject, basis in sorted(wanted.items()):
        current, package = held.get(subject), packages[subject]
        if current is None or not current.active:
            reason = Reason.FIRST_SIGNAL if current is None else Reason.REACTIVATED
            at = facts.allocated_at(subject)
            sequence = _next_event(current)
            changes.append(
                LicenseChange(ChangeKind.ALLOCATED, *subject, basis, reason, at, package, sequence)
            )
        elif current.basis != basis:
            changes.append(
                LicenseChange(ChangeKind.BASIS_CHANGED, *subject, basis, None, now, package)
            )
        elif current.package != package:
            changes.append(
                LicenseChange(ChangeKind.PACKAGE_CHANGED, *subject, basis, None, now, package)
            )
    for subject, current in sorted(held.items()):
        if current.active and subject not in wanted:
            reason, at = facts.release(subject, current.basis)
            changes.append(
                LicenseChange(
                    ChangeKind.RELEASED,
                    *subject,
                    current.basis,
                    reason,
                    at,
                    current.package,
                    _next_event(current),
                )
            )
    return changes


def _next_event(current: HeldLicense | None) -> int:
    return 1 if current is None else current.event_sequence + 1


def _terms(terms: CustomerTerms | str) -> CustomerTerms:
    return terms if isinstance(terms, CustomerTerms) else CustomerTerms(license_model=terms)


class _SubjectFacts:
    """Reasons and effective times of changes, derived from the devices behind a subject."""

    def __init__(
        self,
        devices: Sequence[DeviceFacts],
        now: datetime,
        window: timedelta,
        terms: CustomerTerms,
    ) -> None:
        self._now = now
        self._window = window
        self._terms = terms
        self._by_device = {device.device_id: device for device in devices}
        self._by_user: dict[str, list[DeviceFacts]] = defaultdict(list)
        for device in devices:
            if device.user_id is not None:
                self._by_user[device.user_id].append(device)

    def _devices_of(self, subject: Subject) -> list[DeviceFacts]:
        subject_type, subject_id = subject
        if subject_type is SubjectType.USER:
            return self._by_user.get(subject_id, [])
        device = self._by_device.get(subject_id)
        return [device] if device else []

    def allocated_at(self, subject: Subject) -> datetime:
        """An allocation takes effect at the newest signal that made the subject count: never
        back-dated to a device's first sighting, which may predate a move between users, nor
        to before the customer's reactivation."""
        devices = self._devices_of(subject)
        newest = max(d.last_seen_at for d in devices if counts(d, self._now, self._window))
        reactivated_at = self._terms.status_changed_at
        return newest if reactivated_at is None else max(newest, reactivated_at)

    def release(self, subject: Subject, basis: Basis) -> tuple[Reason, datetime]:
        if not self._terms.active:
            return Reason.CUSTOMER_INACTIVATED, self._terms.status_changed_at or self._now
        devices = self._devices_of(subject)
        if not devices:
            return Reason.NO_DEVICES, self._now
        if any(counts(device, self._now, self._window) for device in devices):
            # Still counting, yet no longer licensed as this subject.
            model_changed = (basis is Basis.DEVICE_MODEL) != (self._terms.license_model == "device")
            reason = Reason.LICENSE_MODEL_CHANGED if model_changed else Reason.COVERED_BY_USER
            return reason, self._now
        # The subject stopped counting when its last device did, for that device's reason.
        at, stop_reason = max(self._stopped_counting(device) for device in devices)
        return Reason(stop_reason), at

    def _stopped_counting(self, device: DeviceFacts) -> tuple[datetime, str]:
        silent_at = (device.last_present_at or device.last_seen_at) + self._window
        if device.protected or device.last_uninstalled_at is None:
            return device.last_seen_at + self._window, Reason.INACTIVE.value
        if device.last_uninstalled_at <= silent_at:
            return device.last_uninstalled_at, Reason.UNINSTALLED.value
        return silent_at, Reason.INACTIVE.value


def license_event_id(  # noqa: PLR0917 - the key, then the parts in hashing order
    key: bytes,
    customer_id: str,
    event_type: str,
    subject_type: str,
    subject_id: str,
    effective_at: datetime,
    *,
    sequence: int | None = None,
) -> str:
    """Deterministic: the same decision always gets the same id, so billing can de-duplicate
    a re-published event, and a decision lost with its transaction and made again from the
    same stored state gets it again. A license decision's `sequence` (the subject's event
    number) makes two decisions of one subject two events even when their type and
    effective time agree (allocated, released, allocated again). Ids may contain the
    separator: it is escaped, so two customers' decisions never hash alike (the outbox would
    keep only one of them).

    Keyed (`key`: `Settings.event_id_key()`, derived from the pseudonym key): the id is the
    first 128 bits of HMAC-SHA256 over the escaped parts, laid out as a UUIDv8 (RFC 9562:
    version 8, variant 10), so an id reveals nothing of its subject, and a guessed user id
    cannot be tested against a purged user's events, without the key."""
    parts: tuple[str, ...] = (
        customer_id,
        event_type,
        subject_type,
        subject_id,
        effective_at.isoformat(),
    )
    if sequence is not None:
        parts += (str(sequence),)
    name = "|".join(_escape_separator(part) for part in parts)
    return str(keyed_uuid(key, name))


def keyed_uuid(key: bytes, name: str) -> uuid.UUID:
    """A UUIDv8 from the first 16 bytes of HMAC-SHA256(key, name)."""
    digest = bytearray(hmac.new(key, name.encode(), hashlib.sha256).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x80  # version 8
    digest[8] = (digest[8] & 0x3F) | 0x80  # variant 10 (RFC 9562)
    return uuid.UUID(bytes=bytes(digest))


def _escape_separator(part: str) -> str:
    # Ids without `\` or `|` are unchanged, and so are the ids of their events.
    return part.replace("\\", "\\\\").replace("|", "\\|")


def purge_due_at(released_at: datetime, retention: timedelta) -> datetime:
    return released_at + retention
