"""Seats are made visible: each crossing of a subscription's seats is told once."""

from __future__ import annotations

from worker.licensing.subscription_rules import SeatUsage, seat_crossings, seat_event_type


def usage(used: int, was_over: bool, seats: int = 10) -> SeatUsage:
    return SeatUsage("c", f"s-{used}-{was_over}", "core", None, seats, used, was_over)


def test_only_a_change_of_side_is_a_crossing() -> None:
    usages = [usage(10, False), usage(11, False), usage(11, True), usage(10, True), usage(0, False)]
    crossed = seat_crossings(usages)
    assert [(u.used, u.was_over) for u in crossed] == [(11, False), (10, True)]
    assert [seat_event_type(u) for u in crossed] == [
        "subscription.over_seats",
        "subscription.within_seats",
    ]


def test_exactly_the_seats_is_within_them() -> None:
    assert not usage(10, False).over
    assert usage(11, False).over
    assert not usage(0, False, seats=0).over
    assert usage(1, False, seats=0).over
