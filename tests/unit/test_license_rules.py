"""`worker.licensing.rules`: which licenses a fleet calls for, and the changes that get there."""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.licensing.rules import (
    Basis,
    ChangeKind,
    DeviceFacts,
    HeldLicense,
    LicenseChange,
    Reason,
    Subject,
    SubjectType,
    desired_licenses,
    license_changes,
)

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
WINDOW = timedelta(days=30)

ALLOCATED = ChangeKind.ALLOCATED
RELEASED = ChangeKind.RELEASED
BASIS_CHANGED = ChangeKind.BASIS_CHANGED


def ago(days: float = 0, *, hours: float = 0, minutes: float = 0) -> datetime:
    return NOW - timedelta(days=days, hours=hours, minutes=minutes)


def user(user_id: str) -> Subject:
    return (SubjectType.USER, user_id)


def dev(device_id: str) -> Subject:
    return (SubjectType.DEVICE, device_id)


def device(
    device_id: str,
    user_id: str | None = "alice",
    kind: str | None = "business",
    *,
    first: datetime | None = None,
    last: datetime | None = None,
    protected: bool = True,
    uninstalled: datetime | None = None,
) -> DeviceFacts:
    """A device of `user_id`, first seen 100 days ago and last seen an hour ago by default.
    An unprotected device's uninstall is its last signal unless told otherwise."""
    last_seen = last or ago(hours=1)
    if not protected and uninstalled is None:
        uninstalled = last_seen
    return DeviceFacts(
        device_id=device_id,
        user_id=user_id,
        kind=kind,
        protected=protected,
        first_seen_at=first or ago(100),
        last_seen_at=last_seen,
        last_uninstalled_at=uninstalled,
    )


def active(basis: Basis) -> HeldLicense:
    return HeldLicense(active=True, basis=basis)


def released(basis: Basis) -> HeldLicense:
    return HeldLicense(active=False, basis=basis)


def change(
    kind: ChangeKind,
    subject: Subject,
    basis: Basis,
    reason: Reason | None,
    effective_at: datetime,
    sequence: int | None = None,
) -> LicenseChange:
    """A change as decided over a license held with no event yet (`active`, `released`):
    an allocation or release is then the subject's event number 1."""
    if sequence is None:
        sequence = 1 if kind in (ChangeKind.ALLOCATED, ChangeKind.RELEASED) else 0
    return LicenseChange(
        kind, subject[0], subject[1], basis, reason, effective_at, sequence=sequence
    )


# --- desired_licenses: the table -----------------------------------------------------------

DESIRED_CASES = [
    pytest.param(
        [device("b1"), device("p1", kind="personal"), device("p2", kind="personal")],
        "user",
        {user("alice"): Basis.USER},
        id="1-business-2-personal-one-user-license",
    ),
    pytest.param(
        [device("b1", first=ago(50)), device("b2", first=ago(10))],
        "user",
        {user("alice"): Basis.USER, dev("b2"): Basis.OVER_ALLOWANCE},
        id="2nd-business-is-over-allowance",
    ),
    pytest.param(
        [
            device("b1"),
            device("p1", kind="personal", first=ago(60)),
            device("p2", kind="personal", first=ago(40)),
            device("p3", kind="personal", first=ago(20)),
        ],
        "user",
        {user("alice"): Basis.USER, dev("p3"): Basis.OVER_ALLOWANCE},
        id="3rd-personal-is-over-allowance",
    ),
    pytest.param(
        [device("a-newest", first=ago(5)), device("z-oldest", first=ago(50))],
        "user",
        {user("alice"): Basis.USER, dev("a-newest"): Basis.OVER_ALLOWANCE},
        id="over-allowance-is-most-recently-first-seen",
    ),
    pytest.param(
        [device("b-2", first=ago(10)), device("b-1", first=ago(10))],
        "user",
        {user("alice"): Basis.USER, dev("b-2"): Basis.OVER_ALLOWANCE},
        id="first-seen-tie-broken-by-device-id",
    ),
    pytest.param(
        [
            device("p1", kind="personal", first=ago(9)),
            device("p2", kind="personal", first=ago(8)),
            device("b1", first=ago(1)),
        ],
        "user",
        {user("alice"): Basis.USER},
        id="newest-first-seen-covered-when-its-kind-has-room",
    ),
    pytest.param(
        [device("b1", first=ago(50)), device("k0", kind=None, first=ago(10))],
        "user",
        {user("alice"): Basis.USER, dev("k0"): Basis.OVER_ALLOWANCE},
        id="kind-none-counts-as-business",
    ),
    pytest.param(
        [
            device("k0", kind=None),
            device("p1", kind="personal"),
            device("p2", kind="personal"),
        ],
        "user",
        {user("alice"): Basis.USER},
        id="kind-none-takes-the-business-slot-not-personal",
    ),
    pytest.param(
        [device("u1", user_id=None)],
        "user",
        {dev("u1"): Basis.UNASSIGNED},
        id="unassigned-counting-device",
    ),
    pytest.param(
        [device("u1", user_id=None, kind="personal"), device("u2", user_id=None, kind=None)],
        "user",
        {dev("u1"): Basis.UNASSIGNED, dev("u2"): Basis.UNASSIGNED},
        id="unassigned-regardless-of-kind",
    ),
    pytest.param(
        [device("b1", first=ago(50), protected=False), device("b2", first=ago(10))],
        "user",
        {user("alice"): Basis.USER},
        id="uninstalled-device-frees-its-slot",
    ),
    pytest.param(
        [device("b1", protected=False), device("p1", kind="personal", protected=False)],
        "user",
        {},
        id="all-devices-uninstalled-no-user-license",
    ),
    pytest.param(
        [device("u1", user_id=None, protected=False)],
        "user",
        {},
        id="uninstalled-unassigned-consumes-nothing",
    ),
    pytest.param(
        [device("b1", last=ago(30))],
        "user",
        {},
        id="silent-exactly-30d-does-not-count",
    ),
    pytest.param(
        [device("b1", last=ago(29, hours=23, minutes=59))],
        "user",
        {user("alice"): Basis.USER},
        id="silent-29d-23h59m-counts",
    ),
    pytest.param(
        [device("u1", user_id=None, last=ago(30))],
        "user",
        {},
        id="unassigned-silent-exactly-30d",
    ),
    pytest.param(
        [device("b1", first=ago(50)), device("b2", first=ago(10), last=ago(31))],
        "user",
        {user("alice"): Basis.USER},
        id="silent-over-allowance-device-drops",
    ),
    pytest.param(
        [device("b1", first=ago(50), last=ago(31)), device("b2", first=ago(10))],
        "user",
        {user("alice"): Basis.USER},
        id="silent-covered-device-lets-the-next-be-covered",
    ),
    pytest.param(
        [device("b1", first=ago(50)), device("b2", first=ago(10)), device("c1", user_id="bob")],
        "user",
        {user("alice"): Basis.USER, dev("b2"): Basis.OVER_ALLOWANCE, user("bob"): Basis.USER},
        id="allowance-is-per-user",
    ),
    pytest.param(
        [
            device("b1"),
            device("p1", kind="personal"),
            device("p2", kind="personal"),
            device("u1", user_id=None),
        ],
        "device",
        {
            dev("b1"): Basis.DEVICE_MODEL,
            dev("p1"): Basis.DEVICE_MODEL,
            dev("p2"): Basis.DEVICE_MODEL,
            dev("u1"): Basis.DEVICE_MODEL,
        },
        id="device-model-every-counting-device-no-user",
    ),
    pytest.param(
        [
            device("b1"),
            device("b2", protected=False),
            device("b3", last=ago(30)),
            device("u1", user_id=None, last=ago(29, hours=23, minutes=59)),
        ],
        "device",
        {dev("b1"): Basis.DEVICE_MODEL, dev("u1"): Basis.DEVICE_MODEL},
        id="device-model-skips-uninstalled-and-silent",
    ),
    pytest.param([], "user", {}, id="no-devices"),
]


@pytest.mark.parametrize(("devices", "model", "expected"), DESIRED_CASES)
def test_desired_licenses(
    devices: list[DeviceFacts], model: str, expected: dict[Subject, Basis]
) -> None:
    assert desired_licenses(devices, model, NOW, WINDOW) == expected


@pytest.mark.parametrize("first_seen_days", list(itertools.permutations([10, 20, 30, 40])), ids=str)
def test_which_device_is_covered_never_changes_the_count(
    first_seen_days: tuple[int, ...],
) -> None:
    devices = [
        device(f"b{i}", first=ago(days), kind=kind)
        for i, (days, kind) in enumerate(
            zip(first_seen_days, ["business", "business", "personal", None], strict=True)
        )
    ]
    wanted = desired_licenses(devices, "user", NOW, WINDOW)
    # Business-like (incl. kind None): three devices for one slot; one personal, covered.
    over = [subject for subject, basis in wanted.items() if basis is Basis.OVER_ALLOWANCE]
    assert len(wanted) == 3
    assert len(over) == 2
    business_like = [d for d in devices if d.kind != "personal"]
    oldest = min(business_like, key=lambda d: d.first_seen_at)
    assert dev(oldest.device_id) not in wanted


def test_event_numbers_continue_from_the_held_license() -> None:
    """Each allocation or release is the subject's next event; other changes are none."""
    held = {
        user("alice"): HeldLicense(active=False, basis=Basis.USER, event_sequence=2),
        dev("b2"): HeldLicense(active=True, basis=Basis.OVER_ALLOWANCE, event_sequence=5),
        dev("b1"): HeldLicense(active=True, basis=Basis.OVER_ALLOWANCE, event_sequence=1),
    }
    devices = [
        device("b3", first=ago(50)),
        device("b2", first=ago(10), protected=False),
        device("b1", user_id=None),
    ]
    changes = {c.subject: c for c in license_changes(devices, held, "user", NOW, WINDOW)}
    assert (changes[user("alice")].kind, changes[user("alice")].sequence) == (ALLOCATED, 3)
    assert (changes[dev("b2")].kind, changes[dev("b2")].sequence) == (RELEASED, 6)
    assert (changes[dev("b1")].kind, changes[dev("b1")].sequence) == (ChangeKind.BASIS_CHANGED, 0)


# --- license_changes: the table --------------------------------------------------------------

CHANGE_CASES = [
    pytest.param(
        [
            device("b1", first=ago(10)),
            device("p1", kind="personal", first=ago(20)),
            device("p0", kind="personal", first=ago(90), protected=False),
        ],
        {},
        "user",
        [change(ALLOCATED, user("alice"), Basis.USER, Reason.FIRST_SIGNAL, ago(hours=1))],
        id="first-signal-at-newest-counting-signal",
    ),
    pytest.param(
        [device("b1", last=ago(2)), device("p1", kind="personal", last=ago(1))],
        {user("alice"): released(Basis.USER)},
        "user",
        [change(ALLOCATED, user("alice"), Basis.USER, Reason.REACTIVATED, ago(1))],
        id="reactivated-at-latest-last-seen",
    ),
    pytest.param(
        [device("b1", last=ago(2)), device("b0", last=ago(0, hours=1), protected=False)],
        {user("alice"): released(Basis.USER)},
        "user",
        [change(ALLOCATED, user("alice"), Basis.USER, Reason.REACTIVATED, ago(2))],
        id="reactivated-ignores-uninstalled-devices-signals",
    ),
    pytest.param(
        [device("u1", user_id=None, first=ago(3))],
        {},
        "user",
        # Counted since its first sighting: its signals are less than the window apart.
        [change(ALLOCATED, dev("u1"), Basis.UNASSIGNED, Reason.FIRST_SIGNAL, ago(3))],
        id="unassigned-first-signal",
    ),
    pytest.param(
        [device("b1", first=ago(50)), device("b2", first=ago(10), last=ago(4))],
        {user("alice"): active(Basis.USER), dev("b2"): released(Basis.OVER_ALLOWANCE)},
        "user",
        [change(ALLOCATED, dev("b2"), Basis.OVER_ALLOWANCE, Reason.REACTIVATED, ago(4))],
        id="over-allowance-reactivated",
    ),
    pytest.param(
        [device("b1", last=ago(31)), device("p1", kind="personal", last=ago(40))],
        {user("alice"): active(Basis.USER)},
        "user",
        [change(RELEASED, user("alice"), Basis.USER, Reason.INACTIVE, ago(1))],
        id="user-inactive-30d-at-last-signal-plus-window",
    ),
    pytest.param(
        [device("u1", user_id=None, last=ago(30))],
        {dev("u1"): active(Basis.UNASSIGNED)},
        "user",
        [change(RELEASED, dev("u1"), Basis.UNASSIGNED, Reason.INACTIVE, NOW)],
        id="unassigned-inactive-exactly-at-boundary",
    ),
    pytest.param(
        [
            device("b1", protected=False, uninstalled=ago(3), last=ago(3)),
            device("p1", kind="personal", protected=False, uninstalled=ago(1), last=ago(1)),
        ],
        {user("alice"): active(Basis.USER)},
        "user",
        [change(RELEASED, user("alice"), Basis.USER, Reason.UNINSTALLED, ago(1))],
        id="user-uninstalled-at-latest-uninstall",
    ),
    pytest.param(
        [device("b1", first=ago(50)), device("b2", first=ago(10), protected=False, last=ago(2))],
        {user("alice"): active(Basis.USER), dev("b2"): active(Basis.OVER_ALLOWANCE)},
        "user",
        [change(RELEASED, dev("b2"), Basis.OVER_ALLOWANCE, Reason.UNINSTALLED, ago(2))],
        id="over-allowance-device-uninstalled",
    ),
    pytest.param(
        [device("b1", first=ago(50), last=ago(31)), device("b2", first=ago(10))],
        {user("alice"): active(Basis.USER), dev("b2"): active(Basis.OVER_ALLOWANCE)},
        "user",
        # At the newest signal decided (here b2's own), never later than the decision.
        [
            change(
                RELEASED, dev("b2"), Basis.OVER_ALLOWANCE, Reason.COVERED_BY_USER, ago(0, hours=1)
            )
        ],
        id="covered-by-user-when-covered-device-goes-silent",
    ),
    pytest.param(
        [device("b1", user_id="alice")],
        {dev("b1"): active(Basis.UNASSIGNED)},
        "user",
        [
            # The device license ends where the user's begins: at the signal naming the user.
            change(ALLOCATED, user("alice"), Basis.USER, Reason.FIRST_SIGNAL, ago(0, hours=1)),
            change(RELEASED, dev("b1"), Basis.UNASSIGNED, Reason.COVERED_BY_USER, ago(0, hours=1)),
        ],
        id="unassigned-device-gets-a-user-with-room",
    ),
    pytest.param(
        [device("b1", user_id="bob", first=ago(7))],
        {user("alice"): active(Basis.USER)},
        "user",
        [
            # Alice's license ends where Bob's begins: at the signal that moved the device.
            change(ALLOCATED, user("bob"), Basis.USER, Reason.FIRST_SIGNAL, ago(0, hours=1)),
            change(RELEASED, user("alice"), Basis.USER, Reason.NO_DEVICES, ago(0, hours=1)),
        ],
        id="no-devices-when-only-device-moves-to-another-user",
    ),
    pytest.param(
        [device("b1", first=ago(50)), device("b2", first=ago(10))],
        {user("alice"): active(Basis.USER), dev("b2"): active(Basis.OVER_ALLOWANCE)},
        "device",
        [
            change(ALLOCATED, dev("b1"), Basis.DEVICE_MODEL, Reason.FIRST_SIGNAL, ago(0, hours=1)),
            change(BASIS_CHANGED, dev("b2"), Basis.DEVICE_MODEL, None, NOW),
            change(RELEASED, user("alice"), Basis.USER, Reason.LICENSE_MODEL_CHANGED, NOW),
        ],
        id="license-model-changed-user-to-device",
    ),
    pytest.param(
        [device("b1", first=ago(50)), device("b2", first=ago(10))],
        {user("alice"): active(Basis.USER), dev("b2"): active(Basis.OVER_ALLOWANCE)},
        "user",
        [],
        id="steady-state-no-changes",
    ),
    pytest.param(
        [device("b1", first=ago(50)), device("b2", first=ago(10))],
        {user("alice"): active(Basis.USER), dev("b2"): active(Basis.UNASSIGNED)},
        "user",
        [change(BASIS_CHANGED, dev("b2"), Basis.OVER_ALLOWANCE, None, NOW)],
        id="basis-changed-unassigned-to-over-allowance",
    ),
    pytest.param(
        [device("u1", user_id=None)],
        {dev("u1"): active(Basis.OVER_ALLOWANCE)},
        "user",
        [change(BASIS_CHANGED, dev("u1"), Basis.UNASSIGNED, None, NOW)],
        id="basis-changed-over-allowance-to-unassigned",
    ),
    pytest.param(
        [device("b1", protected=False)],
        {user("alice"): released(Basis.USER)},
        "user",
        [],
        id="released-stays-released",
    ),
]


@pytest.mark.parametrize(("devices", "held", "model", "expected"), CHANGE_CASES)
def test_license_changes(
    devices: list[DeviceFacts],
    held: dict[Subject, HeldLicense],
    model: str,
    expected: list[LicenseChange],
) -> None:
    assert license_changes(devices, held, model, NOW, WINDOW) == expected


def test_license_model_changed_device_to_user() -> None:
    devices = [device("b1", first=ago(50)), device("b2", first=ago(10))]
    held = {dev("b1"): active(Basis.DEVICE_MODEL), dev("b2"): active(Basis.DEVICE_MODEL)}
    assert license_changes(devices, held, "user", NOW, WINDOW) == [
        change(BASIS_CHANGED, dev("b2"), Basis.OVER_ALLOWANCE, None, NOW),
        change(ALLOCATED, user("alice"), Basis.USER, Reason.FIRST_SIGNAL, ago(0, hours=1)),
        change(RELEASED, dev("b1"), Basis.DEVICE_MODEL, Reason.LICENSE_MODEL_CHANGED, NOW),
    ]


def test_release_when_last_counting_device_uninstalled_beside_a_silent_one() -> None:
    devices = [
        device("b1", last=ago(40)),  # protected, silent for 40 days
        device("p1", kind="personal", protected=False, uninstalled=ago(1), last=ago(1)),
    ]
    # The user was licensed through p1 until yesterday's uninstall.
    assert license_changes(devices, {user("alice"): active(Basis.USER)}, "user", NOW, WINDOW) == [
        change(RELEASED, user("alice"), Basis.USER, Reason.UNINSTALLED, ago(1))
    ]


def test_moved_device_does_not_backdate_new_users_license() -> None:
    devices = [device("b1", user_id="bob", first=ago(100), last=ago(0, minutes=5))]
    changes = license_changes(devices, {user("alice"): active(Basis.USER)}, "user", NOW, WINDOW)
    allocated = next(c for c in changes if c.kind is ALLOCATED)
    release = next(c for c in changes if c.kind is RELEASED)
    # Bob's license starts at the signal that moved the device, not at its first sighting;
    # Alice's ends when the move is decided: at most the processing delay overlaps.
    assert allocated.effective_at == ago(0, minutes=5)
    assert release.effective_at - allocated.effective_at <= timedelta(minutes=5)


def test_device_pushed_over_allowance_is_not_backdated() -> None:
    returning = device("b1", first=ago(100), last=ago(0, hours=1))  # silent 40d until now
    covered_meanwhile = device("b2", first=ago(50))
    changes = license_changes(
        [returning, covered_meanwhile], {user("alice"): active(Basis.USER)}, "user", NOW, WINDOW
    )
    assert [(c.kind, c.subject, c.basis) for c in changes] == [
        (ALLOCATED, dev("b2"), Basis.OVER_ALLOWANCE)
    ]
    assert changes[0].effective_at >= returning.last_seen_at


# --- properties over random fleets -----------------------------------------------------------

MINUTE = timedelta(minutes=1)
SPAN_MINUTES = 60 * 24 * 60
BOUNDARIES = [-WINDOW, -WINDOW + MINUTE, -WINDOW - MINUTE, timedelta(0)]


device_traits = st.tuples(
    st.one_of(
        st.integers(-SPAN_MINUTES, SPAN_MINUTES).map(lambda m: m * MINUTE),
        st.sampled_from(BOUNDARIES),
    ),
    st.integers(0, 6),  # first seen, in steps of 20 days: few values, so ties are common
    st.sampled_from(["business", "personal", None]),
    st.booleans(),  # protected
    st.integers(-1, 3),  # uninstalled days before last seen (-1: never, if protected)
)


@st.composite
def fleets(draw: st.DrawFn) -> list[DeviceFacts]:
    """A few users with 0-8 devices each plus a few unassigned devices; last seen within
    60 days either side of now, with extra weight on the 30-day boundary."""
    users = draw(st.integers(0, 4))
    owners: list[str | None] = [f"user-{u}" for u in range(users)] + [None]
    devices = []
    number = itertools.count()
    for owner in owners:
        for offset, first_steps, kind, protected, uninstall_days in draw(
            st.lists(device_traits, max_size=8 if owner else 3)
        ):
            last_seen = NOW + offset
            first_seen = min(last_seen, NOW - first_steps * timedelta(days=20))
            uninstalled = None
            if not protected or uninstall_days >= 0:
                # Unprotected: uninstalled at or before its last signal; protected: reinstalled.
                uninstalled = last_seen - max(uninstall_days, 0) * timedelta(days=1)
                if protected:
                    uninstalled = min(uninstalled, first_seen)
            devices.append(
                DeviceFacts(
                    device_id=f"dev-{next(number)}",
                    user_id=owner,
                    kind=kind,
                    protected=protected,
                    first_seen_at=first_seen,
                    last_seen_at=last_seen,
                    last_uninstalled_at=uninstalled,
                )
            )
    return devices


models = st.sampled_from(["user", "device"])
held_licenses = st.one_of(
    st.none(),
    st.builds(HeldLicense, active=st.booleans(), basis=st.sampled_from(list(Basis))),
)


@st.composite
def fleets_with_held(
    draw: st.DrawFn,
) -> tuple[list[DeviceFacts], dict[Subject, HeldLicense]]:
    """A fleet and the stored license rows of its subjects (and of a user with no devices)."""
    devices = draw(fleets())
    subjects = {dev(d.device_id) for d in devices}
    subjects |= {user(d.user_id) for d in devices if d.user_id is not None}
    subjects.add(user("user-gone"))
    held = {}
    for subject in sorted(subjects):
        row = draw(held_licenses)
        if row is not None:
            held[subject] = row
    return devices, held


def is_counting(d: DeviceFacts) -> bool:
    return d.protected and NOW - d.last_seen_at < WINDOW


def expected_consumed(devices: Sequence[DeviceFacts], model: str) -> int:
    counting = [d for d in devices if is_counting(d)]
    if model == "device":
        return len(counting)
    per_user: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    unassigned = 0
    for d in counting:
        if d.user_id is None:
            unassigned += 1
        else:
            per_user[d.user_id][d.kind or "business"] += 1
    return unassigned + sum(
        1 + max(0, kinds["business"] - 1) + max(0, kinds["personal"] - 2)
        for kinds in per_user.values()
    )


def apply(
    held: Mapping[Subject, HeldLicense], changes: Sequence[LicenseChange]
) -> dict[Subject, HeldLicense]:
    after = dict(held)
    for c in changes:
        before = after.get(c.subject)
        sequence = c.sequence or (before.event_sequence if before else 0)
        after[c.subject] = HeldLicense(
            active=c.kind is not RELEASED, basis=c.basis, event_sequence=sequence
        )
    return after


FAST = settings(max_examples=100, deadline=None)


@FAST
@given(devices=fleets(), model=models)
def test_uninstalled_devices_consume_nothing(devices: list[DeviceFacts], model: str) -> None:
    wanted = desired_licenses(devices, model, NOW, WINDOW)
    for d in devices:
        if not d.protected:
            assert dev(d.device_id) not in wanted
    by_user: dict[str, list[DeviceFacts]] = defaultdict(list)
    for d in devices:
        if d.user_id is not None:
            by_user[d.user_id].append(d)
    for user_id, user_devices in by_user.items():
        if not any(d.protected for d in user_devices):
            assert user(user_id) not in wanted


@FAST
@given(devices=fleets(), model=models)
def test_licenses_consumed(devices: list[DeviceFacts], model: str) -> None:
    wanted = desired_licenses(devices, model, NOW, WINDOW)
    users = [s for s in wanted if s[0] is SubjectType.USER]
    device_licenses = [s for s in wanted if s[0] is SubjectType.DEVICE]
    assert len(wanted) == len(users) + len(device_licenses) == expected_consumed(devices, model)
    counting = {d.device_id for d in devices if is_counting(d)}
    assert {s[1] for s in device_licenses} <= counting
    if model == "device":
        assert users == []
        assert set(wanted.values()) <= {Basis.DEVICE_MODEL}
    else:
        assert Basis.DEVICE_MODEL not in wanted.values()
        assert {s[1] for s in users} == {
            d.user_id for d in devices if is_counting(d) and d.user_id is not None
        }


@FAST
@given(fleet=fleets_with_held(), model=models, data=st.data())
def test_order_of_devices_does_not_matter(
    fleet: tuple[list[DeviceFacts], dict[Subject, HeldLicense]],
    model: str,
    data: st.DataObject,
) -> None:
    devices, held = fleet
    shuffled = data.draw(st.permutations(devices))
    assert desired_licenses(shuffled, model, NOW, WINDOW) == desired_licenses(
        devices, model, NOW, WINDOW
    )
    assert license_changes(shuffled, held, model, NOW, WINDOW) == license_changes(
        devices, held, model, NOW, WINDOW
    )


@FAST
@given(fleet=fleets_with_held(), model=models)
def test_changes_reach_a_fixed_point(
    fleet: tuple[list[DeviceFacts], dict[Subject, HeldLicense]], model: str
) -> None:
    devices, held = fleet
    after = apply(held, license_changes(devices, held, model, NOW, WINDOW))
    assert license_changes(devices, after, model, NOW, WINDOW) == []
    assert {s: h.basis for s, h in after.items() if h.active} == desired_licenses(
        devices, model, NOW, WINDOW
    )


@FAST
@given(fleet=fleets_with_held(), model=models)
def test_change_reasons(
    fleet: tuple[list[DeviceFacts], dict[Subject, HeldLicense]], model: str
) -> None:
    devices, held = fleet
    changes = license_changes(devices, held, model, NOW, WINDOW)
    assert len({c.subject for c in changes}) == len(changes)
    for c in changes:
        current = held.get(c.subject)
        if c.kind is ALLOCATED:
            assert c.reason is (Reason.FIRST_SIGNAL if current is None else Reason.REACTIVATED)
            assert current is None or not current.active
        elif c.kind is RELEASED:
            assert current is not None
            assert current.active
            assert c.basis is current.basis
            assert c.reason is not None
            if c.reason is Reason.INACTIVE:
                assert c.effective_at <= NOW
        else:
            assert current is not None
            assert current.active
            assert current.basis is not c.basis
            assert c.reason is None
            assert c.effective_at == NOW
