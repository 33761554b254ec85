"""Last-seen precision: a heartbeat that would only move a device's last seen (and its
user's) forward by less than `LAST_SEEN_PRECISION_SECONDS` is not written.

Each replica remembers, per device it owns, what its last write of the device returned
(`LastSeenMemory`). A device's folded change that carries nothing else than such a move is
kept back here (`LastSeenMemory.keep_back`) instead of written; the device's next write
carries it along (`merge_earlier`), so an event processed later but older than a kept-back
heartbeat (a late uninstall, another user) is decided as if every heartbeat had been
written. A written change that is still only a last-seen move is marked for the cheaper
`refresh_devices` (`is_refresh`). The memory is packed (about 50 bytes a device plus its
ids). Pure: no I/O; the caller owns the clock and the writes. docs/ingestion.md,
"Last-seen precision".
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from worker.ingest.coalesce import BatchChanges, DeviceChange, UserChange

DeviceKey = tuple[str, str]


@dataclass(slots=True)
class Remembered:
    """A device as this replica's last write of it left it, and what was kept back since
    (skipped heartbeats, which only ever said what is remembered here): the newest time
    each field was reported, written with the device's next change. What `LastSeenMemory`
    takes (`remember`) and gives back (`get`, a copy); it stores it packed."""

    last_seen_at: datetime
    user_id: str | None
    device_kind: str | None
    agent_version: str | None
    protected: bool
    seen_since: datetime | None = None
    user_reported_since: datetime | None = None
    kind_reported_since: datetime | None = None
    version_reported_since: datetime | None = None
    unattributed_since: datetime | None = None


def is_skippable(change: DeviceChange, remembered: Remembered, precision: timedelta) -> bool:
    """True if writing `change` would only move the device's last seen (and its user's)
    forward by less than `precision`: heartbeats only (no install, uninstall or details), a
    device that is installed (a heartbeat after an uninstall is a reinstall), the same user,
    kind and agent version as stored (or none named), and every event at or after the
    stored last seen and before it plus the precision."""
    return is_refresh(change, remembered) and (
        change.last_seen_at < remembered.last_seen_at + precision
    )


def is_refresh(change: DeviceChange, remembered: Remembered) -> bool:
    """True if writing `change` would only move the device's last seen (and its user's)
    forward, by any amount: `is_skippable` without the precision. The database checks it
    again against the stored row (`refresh_devices`), with the license window."""
    return (
        remembered.protected
        and change.last_installed_at is None
        and change.last_uninstalled_at is None
        and change.details_reported_at is None
        and (change.user_reported_at is None or change.user_id == remembered.user_id)
        and (change.device_kind is None or change.device_kind == remembered.device_kind)
        and (change.agent_version is None or change.agent_version == remembered.agent_version)
        and change.first_seen_at >= remembered.last_seen_at
    )


def merge_earlier(change: DeviceChange, earlier: DeviceChange) -> None:
    """Folds into `change` the changes of messages processed before its own, with the fold's
    rules (worker/ingest/coalesce.py): maxima and minima; a reported value is the newest by
    event time, and a tie goes to the message processed later, `change`'s."""
    change.first_seen_at = min(change.first_seen_at, earlier.first_seen_at)
    change.last_seen_at = max(change.last_seen_at, earlier.last_seen_at)
    change.last_present_at = _later(change.last_present_at, earlier.last_present_at)
    change.last_installed_at = _later(change.last_installed_at, earlier.last_installed_at)
    change.last_uninstalled_at = _later(change.last_uninstalled_at, earlier.last_uninstalled_at)
    change.unattributed_seen_at = _later(change.unattributed_seen_at, earlier.unattributed_seen_at)
    if _wins(earlier.user_reported_at, change.user_reported_at):
        change.user_id, change.user_reported_at = earlier.user_id, earlier.user_reported_at
    if _wins(earlier.kind_reported_at, change.kind_reported_at):
        change.device_kind, change.kind_reported_at = earlier.device_kind, earlier.kind_reported_at
    if _wins(earlier.details_reported_at, change.details_reported_at):
        change.hostname, change.os = earlier.hostname, earlier.os
        change.details_reported_at = earlier.details_reported_at
    if _wins(earlier.agent_version_reported_at, change.agent_version_reported_at):
        change.agent_version = earlier.agent_version
        change.agent_version_reported_at = earlier.agent_version_reported_at


# What `LastSeenMemory.classify` finds a device's change to be.
WRITE, REFRESH, SKIPPABLE = 0, 1, 2
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MICROSECOND = timedelta(microseconds=1)
_NONE = -(2**63)  # no time: below every other, so max() keeps the later of two
_MIN_SLOTS = 1 << 10
_MAX_LOAD = 0.75  # entries (dead ones too) per slot before the slots double
_HASH_BITS = 0xFFFF_FFFF
# What an entry's `_meta` byte says.
_PROTECTED = 1
_DEAD = 2  # forgotten; compacted away when there are many
_NO_USER = 4
_ODD = 8  # the kept-back report times are in `_odd_reports`, not the bits below
# A kept-back report time that equals the kept-back last seen (the usual case: a heartbeat
# reports its user, kind and version at the time it is seen).
_REPORT_BITS = (16, 32, 64, 128)  # user, kind, agent version, unattributed
_ALL_REPORT_BITS = sum(_REPORT_BITS)
_KEEP_BITS = 0xFF & ~(_ODD | _ALL_REPORT_BITS)
_UNCODED = 0  # a kind or version that has no code: the entry's value is in `_uncoded`
_MAX_CODES = {"B": 0xFF, "H": 0xFFFF}
# `_ends` are 32-bit: a device whose ids would not fit is not remembered (full).
_MAX_TEXT = 0xFFFF_FFFF - 2 * 65_536


# Both ways exact until the 23rd century: a float timestamp is within 0.3 µs of the true one
# and both conversions round to the nearest microsecond (tests/unit/test_last_seen_memory.py).
def _micros(at: datetime) -> int:
    return round(at.timestamp() * 1_000_000)


def _micros_or_none(at: datetime | None) -> int:
    return _NONE if at is None else round(at.timestamp() * 1_000_000)


def _datetime(micros: int) -> datetime:
    return datetime.fromtimestamp(micros / 1_000_000, UTC)


def _time(micros: int) -> datetime | None:
    return None if micros == _NONE else datetime.fromtimestamp(micros / 1_000_000, UTC)


class _Codes:
    """Small numbers for the few distinct strings of a column (kinds, agent versions), at
    most `limit`; None beyond it (the entry then keeps its own string)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._numbers: dict[str, int] = {}
        self.values: list[str | None] = [None]  # code 0: none, or kept by the entry

    def code(self, value: str | None) -> int | None:
        if value is None:
            return 0
        number = self._numbers.get(value)
        if number is None:
            if len(self.values) > self._limit:
                return None
            number = self._numbers[value] = len(self.values)
            self.values.append(value)
        return number


class LastSeenMemory:
    """What this replica last wrote for each device it owns, for at most `capacity` devices,
    packed: a device is about 40 bytes plus the UTF-8 of its device id and user id
    (docs/ingestion.md, "Last-seen precision"; `scripts/last_seen_memory_size.py`).
    When full, a further device is not remembered (its heartbeats are written): nothing
    remembered is ever evicted, so no kept-back change is lost while the partitions are
    owned. `forget_all` empties it when partitions are revoked; a write that began before
    (`generation`) no longer fills it.

    Layout: one entry per device in parallel arrays (`array`), found through an
    open-addressing table (`_slots`, linear probing) whose slots hold 32 bits of the key's
    hash and the entry's number. The device id and the user id as first written are UTF-8
    in one `bytearray` (`_text`); customers, kinds and agent versions are numbers for
    strings held once. Times are integer microseconds since the epoch (exact: what is
    written is what was kept back)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.generation = 0
        self._reset()

    def _reset(self) -> None:
        self._live = 0
        self._slots = array("Q", bytes(8 * _MIN_SLOTS))
        self._customer_numbers: dict[str, int] = {}
        self._customers: list[str] = []
        self._kinds, self._versions = _Codes(_MAX_CODES["B"]), _Codes(_MAX_CODES["H"])
        self._customer = array("I")
        self._ends = array("I")  # where the entry's device id and user id end in `_text`
        self._device_length = array("H")
        self._text = bytearray()
        self._meta = array("B")
        self._kind = array("B")
        self._version = array("H")
        self._last_seen = array("q")
        self._seen_since = array("q")  # kept back: the newest last seen, or _NONE
        # Rare: report times kept back that differ from the kept-back last seen; users that
        # changed since the entry was made; kinds and versions beyond the codes.
        self._odd_reports: dict[int, tuple[int, int, int, int]] = {}
        self._moved_users: dict[int, str | None] = {}
        self._uncoded: dict[tuple[int, str], str] = {}

    def __len__(self) -> int:
        return self._live

    # -- finding ---------------------------------------------------------------------------

    def find(self, key: DeviceKey) -> int:
        """The entry of a remembered device, or -1."""
        customer_id, device_id = key
        customer = self._customer_numbers.get(customer_id)
        if customer is None:
            return -1
        wanted = hash(key) & _HASH_BITS
        slots, mask = self._slots, len(self._slots) - 1
        index = wanted & mask
        encoded: bytes | None = None
        while slot := slots[index]:
            if slot >> 32 == wanted:
                entry = (slot & _HASH_BITS) - 1
                if self._customer[entry] == customer and not self._meta[entry] & _DEAD:
                    if encoded is None:
                        encoded = device_id.encode()
                    length = self._device_length[entry]
                    start = self._ends[entry - 1] if entry else 0
                    if length == len(encoded) and self._text[start : start + length] == encoded:
                        return entry
            index = (index + 1) & mask
        return -1

    def recall(self, entry: int) -> Remembered:
        """What the last write of the entry's device left (not what was kept back since)."""
        kind, version = self._kind[entry], self._version[entry]
        return Remembered(
            _datetime(self._last_seen[entry]),
            self._user(entry),
            self._kinds.values[kind] if kind else self._uncoded.get((entry, "kind")),
            self._versions.values[version] if version else self._uncoded.get((entry, "version")),
            bool(self._meta[entry] & _PROTECTED),
        )

    def classify(self, entry: int, change: DeviceChange, precision_micros: int) -> int:
        """`is_skippable` (SKIPPABLE), else `is_refresh` (REFRESH), else WRITE, of a change
        against the entry: the same rules, read from the packed entry without building a
        `Remembered` (tests/unit/test_last_seen_memory.py compares the two)."""
        meta = self._meta[entry]
        if (
            not meta & _PROTECTED
            or change.last_installed_at is not None
            or change.last_uninstalled_at is not None
            or change.details_reported_at is not None
        ):
            return WRITE
        if change.user_reported_at is not None and change.user_id != self._user(entry):
            return WRITE
        if change.device_kind is not None:
            code = self._kind[entry]
            kind = self._kinds.values[code] if code else self._uncoded.get((entry, "kind"))
            if change.device_kind != kind:
                return WRITE
        if change.agent_version is not None:
            code = self._version[entry]
            version = self._versions.values[code] if code else self._uncoded.get((entry, "version"))
            if change.agent_version != version:
                return WRITE
        last_written = self._last_seen[entry]
        first, last = change.first_seen_at, change.last_seen_at
        last_micros = _micros(last)
        if (last_micros if first is last else _micros(first)) < last_written:
            return WRITE
        return SKIPPABLE if last_micros < last_written + precision_micros else REFRESH

    def user_seen_within(self, entry: int, user: UserChange, precision_micros: int) -> bool:
        """True if the user change only moves the last seen of the entry's user (written with
        a last seen at least the device's) by less than the precision."""
        last_written = self._last_seen[entry]
        return (
            user.profile_reported_at is None
            and _micros(user.first_seen_at) >= last_written
            and _micros(user.last_seen_at) < last_written + precision_micros
        )

    def user(self, entry: int) -> str | None:
        return self._user(entry)

    def get(self, key: DeviceKey) -> Remembered | None:
        """A copy of what is remembered of the device, with what was kept back since."""
        entry = self.find(key)
        if entry < 0:
            return None
        remembered = self.recall(entry)
        remembered.seen_since = _time(self._seen_since[entry])
        user, kind, version, unattributed = (_time(t) for t in self._reports(entry))
        remembered.user_reported_since, remembered.kind_reported_since = user, kind
        remembered.version_reported_since, remembered.unattributed_since = version, unattributed
        return remembered

    def _user(self, entry: int) -> str | None:
        if entry in self._moved_users:
            return self._moved_users[entry]
        if self._meta[entry] & _NO_USER:
            return None
        start = (self._ends[entry - 1] if entry else 0) + self._device_length[entry]
        return self._text[start : self._ends[entry]].decode()

    def _coded(self, entry: int, column: str, codes: _Codes, code: int) -> str | None:
        if code == _UNCODED:
            return self._uncoded.get((entry, column))
        return codes.values[code]

    # -- what was kept back ------------------------------------------------------------------

    def _reports(self, entry: int) -> tuple[int, int, int, int]:
        """The kept-back report times (user, kind, version, unattributed), _NONE for none."""
        meta = self._meta[entry]
        if meta & _ODD:
            return self._odd_reports[entry]
        seen = self._seen_since[entry]
        user, kind, version, unattributed = (seen if meta & bit else _NONE for bit in _REPORT_BITS)
        return user, kind, version, unattributed

    def _set_reports(self, entry: int, seen: int, reports: tuple[int, int, int, int]) -> None:
        self._seen_since[entry] = seen
        meta = self._meta[entry]
        if meta & _ODD:
            del self._odd_reports[entry]
        meta &= _KEEP_BITS
        for bit, report in zip(_REPORT_BITS, reports):  # noqa: B905 (both four)
            if report == seen:
                meta |= bit
            elif report != _NONE:
                meta = (meta & _KEEP_BITS) | _ODD
                self._odd_reports[entry] = reports
                break
        self._meta[entry] = meta

    def keep_back(self, entry: int, change: DeviceChange) -> None:
        """Adds a skippable change (`is_skippable`) to what is kept back of the entry."""
        at = change.last_seen_at
        seen, new_seen = self._seen_since[entry], _micros(at)
        user, kind = change.user_reported_at, change.kind_reported_at
        version, unattributed = change.agent_version_reported_at, change.unattributed_seen_at
        meta = self._meta[entry]
        # The usual case: a heartbeat reports what it reports when it is seen, and as the
        # ones kept back before it did.
        if (
            not meta & _ODD
            and new_seen >= seen
            and (user is None or user == at)
            and (kind is None or kind == at)
            and (version is None or version == at)
            and (unattributed is None or unattributed == at)
        ):
            bits = (
                (0 if user is None else _REPORT_BITS[0])
                | (0 if kind is None else _REPORT_BITS[1])
                | (0 if version is None else _REPORT_BITS[2])
                | (0 if unattributed is None else _REPORT_BITS[3])
            )
            if new_seen == seen or meta & _ALL_REPORT_BITS & ~bits == 0:
                self._seen_since[entry] = new_seen
                self._meta[entry] = meta | bits
                return
        added = (user, kind, version, unattributed)
        kept = self._reports(entry)
        reports = (
            kept[0] if added[0] is None else max(kept[0], _micros(added[0])),
            kept[1] if added[1] is None else max(kept[1], _micros(added[1])),
            kept[2] if added[2] is None else max(kept[2], _micros(added[2])),
            kept[3] if added[3] is None else max(kept[3], _micros(added[3])),
        )
        self._set_reports(entry, max(seen, new_seen), reports)

    def kept_back(self, entry: int, key: DeviceKey) -> DeviceChange | None:
        """What was kept back of the entry's device, as a change (None if nothing), and
        forgets it."""
        seen_micros = self._seen_since[entry]
        if seen_micros == _NONE:
            return None
        user, kind, version, unattributed = (_time(t) for t in self._reports(entry))
        seen = _datetime(seen_micros)
        change = DeviceChange(key[0], key[1], seen, seen, last_present_at=seen)
        if user is not None:
            change.user_id, change.user_reported_at = self._user(entry), user
        if kind is not None:
            change.device_kind = self._coded(entry, "kind", self._kinds, self._kind[entry])
            change.kind_reported_at = kind
        if version is not None:
            change.agent_version = self._coded(
                entry, "version", self._versions, self._version[entry]
            )
            change.agent_version_reported_at = version
        change.unattributed_seen_at = unattributed
        self._set_reports(entry, _NONE, (_NONE, _NONE, _NONE, _NONE))
        return change

    def take_kept_back(self) -> BatchChanges:
        """Every device's kept-back changes, as changes to write, and forgets them: a replica
        that loses its devices writes them first."""
        changes = BatchChanges()
        for entry, seen in enumerate(self._seen_since):
            if seen != _NONE and not self._meta[entry] & _DEAD:
                key = self._key(entry)
                kept_back = self.kept_back(entry, key)
                if kept_back is not None:
                    changes.devices[key] = kept_back
        _add_kept_back_users(changes, changes.devices.values())
        return changes

    def _key(self, entry: int) -> DeviceKey:
        start = self._ends[entry - 1] if entry else 0
        device = self._text[start : start + self._device_length[entry]].decode()
        return self._customers[self._customer[entry]], device

    # -- remembering and forgetting ------------------------------------------------------------

    def forget(self, keys: Iterable[DeviceKey]) -> None:
        for key in keys:
            entry = self.find(key)
            if entry >= 0:
                self._meta[entry] |= _DEAD
                self._live -= 1
        if len(self._meta) - self._live > max(_MIN_SLOTS, self._live // 4):
            self._compact()

    def forget_all(self) -> None:
        self._reset()
        self.generation += 1

    def remember(self, key: DeviceKey, written: Remembered, generation: int) -> None:
        """Records what a write returned for a device (its kept-back fields are ignored), if
        the write began in this generation; keeps the device's kept-back changes (added
        since that write began)."""
        if generation != self.generation:
            return
        entry = self.find(key)
        if entry < 0:
            if self._live < self.capacity and len(self._text) < _MAX_TEXT:
                self._add(key, written)
            return
        # A write returned, not a heartbeat kept back: what was kept back stays (it came
        # after the write began).
        self._last_seen[entry] = _micros(written.last_seen_at)
        meta = self._meta[entry] & ~_PROTECTED
        self._meta[entry] = meta | (_PROTECTED if written.protected else 0)
        self._kind[entry] = self._code(entry, "kind", self._kinds, written.device_kind)
        self._version[entry] = self._code(entry, "version", self._versions, written.agent_version)
        self._moved_users.pop(entry, None)
        if self._user(entry) != written.user_id:
            self._moved_users[entry] = written.user_id

    def _code(self, entry: int, column: str, codes: _Codes, value: str | None) -> int:
        code = codes.code(value)
        if code is None:
            self._uncoded[(entry, column)] = value  # type: ignore[assignment]
            return _UNCODED
        self._uncoded.pop((entry, column), None)
        return code

    def _add(self, key: DeviceKey, written: Remembered) -> None:
        customer_id, device_id = key
        customer = self._customer_numbers.get(customer_id)
        if customer is None:
            customer = self._customer_numbers[customer_id] = len(self._customers)
            self._customers.append(customer_id)
        entry = len(self._meta)
        device = device_id.encode()
        self._text += device
        if written.user_id is not None:
            self._text += written.user_id.encode()
        self._ends.append(len(self._text))
        self._device_length.append(len(device))
        self._customer.append(customer)
        self._meta.append(
            (_PROTECTED if written.protected else 0) | (_NO_USER if written.user_id is None else 0)
        )
        self._kind.append(self._code(entry, "kind", self._kinds, written.device_kind))
        self._version.append(self._code(entry, "version", self._versions, written.agent_version))
        self._last_seen.append(_micros(written.last_seen_at))
        self._seen_since.append(_NONE)
        self._live += 1
        if len(self._meta) > len(self._slots) * _MAX_LOAD:
            self._grow()
        self._place(hash(key) & _HASH_BITS, entry)

    def _place(self, hashed: int, entry: int) -> None:
        slots, mask = self._slots, len(self._slots) - 1
        index = hashed & mask
        while slots[index]:
            index = (index + 1) & mask
        slots[index] = (hashed << 32) | (entry + 1)

    def _grow(self) -> None:
        """Twice the slots, every live entry placed again (from the hash bits its slot
        kept)."""
        old = self._slots
        self._slots = array("Q", bytes(16 * len(old)))
        for slot in old:
            if slot and not self._meta[(slot & _HASH_BITS) - 1] & _DEAD:
                self._place(slot >> 32, (slot & _HASH_BITS) - 1)

    def _compact(self) -> None:
        """Rebuilt from its live entries, with what each kept back."""
        live = [
            (key, self.get(key))
            for entry in range(len(self._meta))
            if not self._meta[entry] & _DEAD
            for key in (self._key(entry),)
        ]
        capacity, generation = self.capacity, self.generation
        self._reset()
        self.capacity, self.generation = capacity, generation
        for key, remembered in live:
            assert remembered is not None
            self._add(key, remembered)
            entry = len(self._meta) - 1
            self._set_reports(
                entry,
                _micros_or_none(remembered.seen_since),
                (
                    _micros_or_none(remembered.user_reported_since),
                    _micros_or_none(remembered.kind_reported_since),
                    _micros_or_none(remembered.version_reported_since),
                    _micros_or_none(remembered.unattributed_since),
                ),
            )


def keep_back_unchanged(
    changes: BatchChanges,
    memory: LastSeenMemory,
    precision: timedelta,
    refresh: set[DeviceKey] | None = None,
) -> set[DeviceKey]:
    """Takes out of `changes` every device change that `is_skippable`, keeping it in the
    memory, and the user changes that then only move a remembered user's last seen by less
    than `precision`; merges every written device's kept-back changes into its change.
    A user change that remains is written with its customer's devices, so a customer left
    with one keeps its devices written. Returns the keys of the devices taken out; adds to
    `refresh` those written that are only a last-seen move (`is_refresh`: the database's
    `refresh_devices` writes them more cheaply)."""
    entries = {key: entry for key in changes.devices if (entry := memory.find(key)) >= 0}
    precision_micros = precision // _ONE_MICROSECOND
    devices = changes.devices
    candidates = {
        key: entry
        for key, entry in entries.items()
        if memory.classify(entry, devices[key], precision_micros) == SKIPPABLE
    }
    dropped = _user_changes_within_precision(changes, memory, candidates, precision_micros)
    written_customers = {customer for customer, _ in changes.devices.keys() - candidates.keys()}
    needing_devices = {
        customer
        for customer, user in changes.users.keys() - dropped
        if customer not in written_customers
    }
    if needing_devices:
        candidates = {k: e for k, e in candidates.items() if k[0] not in needing_devices}
        dropped = _user_changes_within_precision(changes, memory, candidates, precision_micros)
    merged: list[DeviceChange] = []
    for key, entry in entries.items():
        change = devices[key]
        if key in candidates:
            memory.keep_back(entry, change)
            continue
        kept_back = memory.kept_back(entry, key)
        if kept_back is not None:
            merge_earlier(change, kept_back)
            merged.append(kept_back)
        if refresh is not None and memory.classify(entry, change, precision_micros) != WRITE:
            refresh.add(key)
    for key in candidates:
        del changes.devices[key]
    for user_key in dropped:
        del changes.users[user_key]
    _add_kept_back_users(changes, merged)
    return set(candidates)


def _user_changes_within_precision(
    changes: BatchChanges,
    memory: LastSeenMemory,
    skipped: dict[DeviceKey, int],
    precision_micros: int,
) -> set[tuple[str, str]]:
    """The user changes that only move the last seen of the remembered user of a skipped
    device by less than the precision: that user was written with a last seen at least the
    device's."""
    dropped = set()
    users = changes.users
    for (customer_id, _), entry in skipped.items():
        if not users:
            break
        user_id = memory.user(entry)
        if user_id is None:
            continue
        user_key = (customer_id, user_id)
        user = users.get(user_key)
        if user is not None and memory.user_seen_within(entry, user, precision_micros):
            dropped.add(user_key)
    return dropped


def _add_kept_back_users(changes: BatchChanges, kept_back: Iterable[DeviceChange]) -> None:
    """The user a kept-back heartbeat named (the remembered one) is seen then too."""
    for pending in kept_back:
        at = pending.user_reported_at
        if pending.user_id is None or at is None:
            continue
        key = (pending.customer_id, pending.user_id)
        user = changes.users.get(key)
        if user is None:
            changes.users[key] = UserChange(pending.customer_id, pending.user_id, at, at)
        else:
            user.first_seen_at = min(user.first_seen_at, at)
            user.last_seen_at = max(user.last_seen_at, at)


def _wins(earlier: datetime | None, later: datetime | None) -> bool:
    return earlier is not None and (later is None or earlier > later)


def _later(current: datetime | None, candidate: datetime | None) -> datetime | None:
    if current is None:
        return candidate
    return current if candidate is None else max(current, candidate)


def co_partitioning_problem(
    topics: tuple[str, str],
    partition_counts: tuple[int | None, int | None],
    assigned: Iterable[tuple[str, int]],
) -> str | None:
    """Why heartbeats may not be skipped with this assignment, or None if they may: the
    replica that writes a device's heartbeats must see its installs and uninstalls (a
    heartbeat after an uninstall is a reinstall). That holds when both agent topics have the
    same number of partitions (producers key both by the device, so a device is on the same
    partition number in each) and this replica has partition p of one exactly when it has
    partition p of the other. Reasons name no input value."""
    heartbeat_count, lifecycle_count = partition_counts
    if heartbeat_count is None or lifecycle_count is None:
        return "partition_count_unknown"
    if heartbeat_count != lifecycle_count:
        return "partition_counts_differ"
    heartbeat_topic, lifecycle_topic = topics
    by_topic: dict[str, set[int]] = {heartbeat_topic: set(), lifecycle_topic: set()}
    for topic, partition in assigned:
        if topic in by_topic:
            by_topic[topic].add(partition)
    if by_topic[heartbeat_topic] != by_topic[lifecycle_topic]:
        return "partitions_not_assigned_together"
    return None
