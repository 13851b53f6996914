"""The memo a sweep's jobs share: bounded, oldest out first, computed once per key."""

import pytest

from flexens.memo import Memo


def test_a_memo_computes_once_per_key_and_keeps_the_newest() -> None:
    memo, calls = Memo(keep=2), []

    def compute(value):
        calls.append(value)
        return value

    assert memo.get_or_compute("a", lambda: compute(1)) == 1
    assert memo.get_or_compute("a", lambda: compute(2)) == 1
    memo.get_or_compute("b", lambda: compute(3))
    memo.get_or_compute("c", lambda: compute(4))  # "a" is the oldest: it goes
    assert calls == [1, 3, 4] and memo.get("a") is None and len(memo) == 2


def test_make_room_lets_the_old_value_go_before_a_new_one_is_built() -> None:
    memo = Memo(keep=1)
    memo.put("members", object())
    memo.make_room()
    assert len(memo) == 0
    with pytest.raises(ValueError, match="at least one"):
        Memo(keep=0)
