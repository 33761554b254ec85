"""How far the console's consumer group is behind (worker/ingest/console_catch_up.py)."""

from __future__ import annotations

from worker.ingest.console_catch_up import messages_behind


def test_a_group_that_committed_every_end_offset_is_not_behind() -> None:
    assert messages_behind({0: 5, 1: 0}, {0: 0, 1: 0}, {0: 5, 1: -1}) == 0


def test_behind_is_the_sum_of_what_each_partition_has_not_committed() -> None:
    assert messages_behind({0: 10, 1: 7, 2: 3}, {0: 0, 1: 0, 2: 0}, {0: 4, 1: 7, 2: 0}) == 9


def test_a_partition_never_committed_counts_from_its_beginning() -> None:
    """Retention may have deleted its start: the group, reset to the earliest offset, has
    only what is left to read."""
    assert messages_behind({0: 100}, {0: 90}, {}) == 10
    assert messages_behind({0: 100}, {0: 90}, {0: -1}) == 10


def test_a_commit_ahead_of_the_end_counts_for_nothing() -> None:
    """An end offset read before the commit it is compared with."""
    assert messages_behind({0: 5}, {0: 0}, {0: 8}) == 0
