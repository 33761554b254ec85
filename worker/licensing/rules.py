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
    # A held license's package changed (a group membership, a subscription attached,
    # activated or cancelled, or a new basis that falls under another package).
    SUBSCRIPTION_CHANGED = "subscription_changed"


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
    `event_sequence` counts the subject's license events so far (allocations, releases and
    package changes)."""

    active: bool
    basis: Basis
    package: str | None = None
    event_sequence: int = 0
    # The effective time of the subject's latest license event (its allocation or a later
    # package change if active, its release if not); None: not known (no event, or a caller
    # that does not tell).
    last_event_at: datetime | None = None


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
    # When each user was first named by a signal (bounds a first allocation: a device moved
    # to a user counted for someone else before).
    user_first_seen: Mapping[str, datetime] = field(default_factory=dict)

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
    # A package change: the package held before it.
    previous_package: str | None = None

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
            at = _not_before(facts.allocated_at(subject, basis, first=current is None), current)
            sequence = _next_event(current)
            changes.append(
                LicenseChange(ChangeKind.ALLOCATED, *subject, basis, reason, at, package, sequence)
            )
        elif current.package != package:
            # Billing bills per package: told, with the new basis if that changed too.
            changes.append(_package_change(subject, basis, package, current, now))
        elif current.basis != basis:
            changes.append(
                LicenseChange(ChangeKind.BASIS_CHANGED, *subject, basis, None, now, package)
            )
    for subject, current in sorted(held.items()):
        if current.active and subject not in wanted:
            reason, at = facts.release(subject, current.basis)
            at = _not_before(at, current)
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


@dataclass(frozen=True, slots=True)
class PendingAllocation:
    """A subject's allocation still in its settle window: decided, not yet published.
    `settled` is the subject's license as billing last heard of it (None: never licensed)."""

    change: LicenseChange
    settled: HeldLicense | None


@dataclass(frozen=True, slots=True)
class SettledDecision:
    # The pending allocations to withdraw (never published; the subject's state and event
    # number return to `settled`) before `changes` are written.
    withdrawn: list[Subject]
    changes: list[LicenseChange]


def settled_license_changes(
    devices: Sequence[DeviceFacts],
    held: Mapping[Subject, HeldLicense],
    terms: CustomerTerms | str,
    now: datetime,
    window: timedelta,
    *,
    pending: Mapping[Subject, PendingAllocation],
) -> SettledDecision:
    """`license_changes`, where an allocation still in its settle window is provisional: it
    is decided again from the state billing last saw, with today's facts.
    - Decided the same: it stays as announced.
    - Decided differently (another effective time, basis, package): it is withdrawn and the
      new allocation takes its number (a late install re-dates a license first decided from
      a heartbeat).
    - Not licensed any more (covered by its user once the kind is known, moved, uninstalled):
      it is withdrawn, and billing hears of neither the allocation nor its release.
    Every signal that arrives within the window is thus decided as if it had arrived in one
    batch with the others: the result depends on the facts, not on their order or batching.
    A license shorter than the window is never billed, as when its install and uninstall
    arrive together."""
    # Only an allocation that is still the subject's last event: one a package change
    # followed (decided on a clock at which it had settled) is never withdrawn.
    pending = {
        s: p
        for s, p in pending.items()
        if s in held and held[s].active and held[s].event_sequence == p.change.sequence
    }
    settled = {s: h for s, h in held.items() if s not in pending}
    settled |= {s: p.settled for s, p in pending.items() if p.settled is not None}
    decided = license_changes(devices, settled, terms, now, window)
    redecided = {c.subject: c for c in decided if c.subject in pending}
    changes = [c for c in decided if c.subject not in pending]
    withdrawn: list[Subject] = []
    for subject, allocation in sorted(pending.items()):
        again = redecided.get(subject)
        if again == allocation.change:
            continue
        withdrawn.append(subject)
        if again is not None:
            changes.append(again)
    changes.sort(key=lambda c: c.subject)
    return SettledDecision(withdrawn, changes)


def _package_change(
    subject: Subject, basis: Basis, package: str | None, current: HeldLicense, now: datetime
) -> LicenseChange:
    """A held license moves to another package at the decision, the subject's next event."""
    return LicenseChange(
        ChangeKind.PACKAGE_CHANGED,
        *subject,
        basis,
        Reason.SUBSCRIPTION_CHANGED,
        _not_before(now, current),
        package,
        _next_event(current),
        previous_package=current.package,
    )


def _not_before(at: datetime, current: HeldLicense | None) -> datetime:
    """A subject's events take effect in the order they are numbered: never before the
    subject's previous event, so its intervals on the topic never overlap."""
    if current is None or current.last_event_at is None:
        return at
    return max(at, current.last_event_at)


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
        # A move or a new covering device is known from the signal that reported it: the
        # newest one decided (as the allocation it makes for the new owner), not later than now.
        self._newest_signal = min(max((d.last_seen_at for d in devices), default=now), now)
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

    def allocated_at(self, subject: Subject, basis: Basis, *, first: bool) -> datetime:
        """When an allocation takes effect: never before the customer's reactivation, and
        - a subject's first license as a user, or as an unassigned device: when it started
          counting, the first sighting of a device that has counted since (first and last
          signal less than the window apart, never uninstalled), not before the user was
          first named (a device moved to a user counted for someone else before);
        - any other (a reactivation, a device pushed over the allowance or to the device
          model): the newest signal that made it count, since its devices' first sightings
          may predate the change.
        The first case depends only on facts every arrival order and batching ends with."""
        devices = [d for d in self._devices_of(subject) if counts(d, self._now, self._window)]
        at = max(d.last_seen_at for d in devices)
        if first:
            started = self._started_counting(subject, basis, devices)
            at = started if started is not None else at
        reactivated_at = self._terms.status_changed_at
        return at if reactivated_at is None else max(at, reactivated_at)

    def _started_counting(
        self, subject: Subject, basis: Basis, devices: Sequence[DeviceFacts]
    ) -> datetime | None:
        user_first_seen = None
        if basis is Basis.USER:
            user_first_seen = self._terms.user_first_seen.get(subject[1])
            if user_first_seen is None:
                return None
        elif basis is not Basis.UNASSIGNED:
            return None
        known = [
            d.first_seen_at
            for d in devices
            if d.last_uninstalled_at is None and d.last_seen_at - d.first_seen_at < self._window
        ]
        if not known:
            return None
        started = min(known)
        return started if user_first_seen is None else max(started, user_first_seen)

    def release(self, subject: Subject, basis: Basis) -> tuple[Reason, datetime]:
        if not self._terms.active:
            return Reason.CUSTOMER_INACTIVATED, self._terms.status_changed_at or self._now
        devices = self._devices_of(subject)
        if not devices:
            return Reason.NO_DEVICES, self._newest_signal
        if any(counts(device, self._now, self._window) for device in devices):
            # Still counting, yet no longer licensed as this subject.
            model_changed = (basis is Basis.DEVICE_MODEL) != (self._terms.license_model == "device")
            if model_changed:
                return Reason.LICENSE_MODEL_CHANGED, self._now
            return Reason.COVERED_BY_USER, self._newest_signal
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
