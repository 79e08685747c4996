"""TagLock with the tag held in memory: what a taker does with each answer the store can give."""

from __future__ import annotations

import pytest

from segmentation.mlops.locks import LockHeldError, LockOwner, TagLock


class Tag:
    """One tag held in memory."""

    def __init__(self) -> None:
        self.value: str | None = None

    def read(self) -> str | None:
        return self.value

    def write(self, value: str) -> None:
        self.value = value

    def delete(self) -> None:
        self.value = None


def lock(tag: Tag) -> TagLock:
    return TagLock("run test", tag.read, tag.write, tag.delete, settle_s=0.01, heartbeat_s=60)


def test_a_write_that_lost_the_race_backs_off_naming_the_winner():
    tag = Tag()
    winner = lock(tag)
    winner.try_acquire()

    def collide(value: str) -> None:  # our insert collided; the tag keeps the winner's record
        raise RuntimeError("UNIQUE constraint failed: tags.key, tags.run_uuid")

    loser = TagLock("run test", tag.read, collide, tag.delete, settle_s=0.01, heartbeat_s=60, stale_after_s=600)
    loser.live_holder = lambda: None  # it read "free" just before the winner's write landed
    with pytest.raises(LockHeldError, match="run test"):
        loser.try_acquire()
    assert loser.me is None and LockOwner.parse(tag.value).owner == winner.me.owner
    winner.release()


def test_an_unreachable_store_is_raised_as_it_is():
    def down(value: str) -> None:
        raise ConnectionError("tracking server unreachable")

    taker = TagLock("run test", lambda: None, down, lambda: None, settle_s=0.01)
    with pytest.raises(ConnectionError):
        taker.try_acquire()


def test_a_released_lock_is_free_for_the_next_taker():
    tag = Tag()
    first = lock(tag)
    first.try_acquire()
    with pytest.raises(LockHeldError):
        lock(tag).try_acquire()
    first.release()
    assert tag.value is None
    second = lock(tag)
    second.try_acquire()
    assert LockOwner.parse(tag.value).owner == second.me.owner
    second.release()
