"""TagLock with the tag held in memory: what a taker does with each answer the store can give."""

from __future__ import annotations

import pytest

from segmentation.mlops.locks import LockHeldError, LockOwner, TagLock


class Tag:
    """One tag; ``fail_after_write`` makes the next write land and then raise, as a retried request does."""

    def __init__(self) -> None:
        self.value: str | None = None
        self.fail_after_write = False

    def read(self) -> str | None:
        return self.value

    def write(self, value: str) -> None:
        self.value = value
        if self.fail_after_write:
            self.fail_after_write = False
            raise RuntimeError("UNIQUE constraint failed: tags.key, tags.run_uuid")

    def delete(self) -> None:
        self.value = None


def lock(tag: Tag) -> TagLock:
    return TagLock("run test", tag.read, tag.write, tag.delete, settle_s=0.01, heartbeat_s=60)


def test_a_write_that_landed_before_its_error_still_takes_the_lock():
    # The taker whose write is in the tag must hold the lock: backing off left the tag naming a process that held
    # nothing, and every other taker was refused until the tag went stale.
    tag = Tag()
    tag.fail_after_write = True
    taker = lock(tag)
    taker.try_acquire()
    assert taker.me is not None and LockOwner.parse(tag.value).owner == taker.me.owner
    other = lock(tag)
    with pytest.raises(LockHeldError):
        other.try_acquire()
    taker.release()
    assert tag.value is None
    other.try_acquire()  # released: the next taker gets it
    other.release()


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
