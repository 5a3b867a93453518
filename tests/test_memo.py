"""BoundedMemo: a memo that never grows past its limit, and forgets everything when full."""

from gatekeeper.memo import BoundedMemo


def test_remember_keeps_values_and_returns_them():
    memo: BoundedMemo[str, int] = BoundedMemo(3)
    assert memo.remember("a", 1) == 1
    assert memo.remember("b", 2) == 2
    assert memo.get("a") == 1 and memo.get("b") == 2 and memo.get("c") is None


def test_a_full_memo_starts_over_with_the_new_entry():
    memo: BoundedMemo[str, int] = BoundedMemo(2)
    memo.remember("a", 1)
    memo.remember("b", 2)
    memo.remember("c", 3)
    assert dict(memo) == {"c": 3}


def test_replacing_a_key_below_the_limit_keeps_the_others():
    memo: BoundedMemo[str, int] = BoundedMemo(3)
    memo.remember("a", 1)
    memo.remember("b", 2)
    memo.remember("a", 10)
    assert dict(memo) == {"a": 10, "b": 2}


def test_it_never_holds_more_than_its_limit():
    memo: BoundedMemo[int, int] = BoundedMemo(5)
    for key in range(1000):
        memo.remember(key, key)
        assert len(memo) <= 5
