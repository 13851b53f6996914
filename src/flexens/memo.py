"""``Memo``: results the jobs of one sweep share, held by the task layer and passed down.

Hydra's basic launcher runs a sweep's jobs one after another in one process, and most of a
calibration (loading members, running them over the calibration split, the λ curve, the
certification, plots that do not mark the chosen point) is the same for every λ. The entry
point owns one :class:`SweepMemo` for its process and hands it to each job; a test or a
notebook passes a fresh one. Keys name everything that shapes a value, so a changed setting
or file simply misses.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


class Memo:
    """At most ``keep`` values by key, the oldest dropped first."""

    def __init__(self, keep: int) -> None:
        if keep < 1:
            raise ValueError(f"a memo keeps at least one value, got keep={keep}")
        self.keep = keep
        self._values: OrderedDict[Hashable, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._values)

    def get(self, key: Hashable) -> Any | None:
        return self._values.get(key)

    def put(self, key: Hashable, value: T) -> T:
        self._values[key] = value
        self._values.move_to_end(key)
        while len(self._values) > self.keep:
            self._values.popitem(last=False)
        return value

    def make_room(self) -> None:
        """Drop the oldest values so one more fits: call before building a large one, so
        the old and the new never sit in memory together."""
        while len(self._values) >= self.keep:
            self._values.popitem(last=False)

    def get_or_compute(self, key: Hashable, compute: Callable[[], T]) -> T:
        if key in self._values:
            self._values.move_to_end(key)
            return self._values[key]
        self.make_room()
        return self.put(key, compute())


@dataclass
class SweepMemo:
    """What one process's calibration jobs share: the last inputs (members and their outputs
    are large, so one set), results derived from them, and rendered plots."""

    inputs: Memo = field(default_factory=lambda: Memo(keep=1))
    derived: Memo = field(default_factory=lambda: Memo(keep=8))
    plots: Memo = field(default_factory=lambda: Memo(keep=16))
