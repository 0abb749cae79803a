"""Reading kopf's in-memory indexes (key -> a store of values) without importing kopf."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from analysis_operator.model.domain import Environment

# What the engine reads: kopf.Index objects, or plain dicts of lists in tests.
Index = Mapping[Any, Any]


@dataclass(frozen=True)
class EnvironmentRecord:
    """An environment as the index holds it: its typed spec and its status as last seen."""

    environment: Environment
    status: Mapping[str, Any]


def first(index: Index, key: Any) -> Any:
    for value in index.get(key, ()):
        return value
    return None


def values(index: Index) -> Iterator[Any]:
    """Every value of an index (one per key for ours); keys are copied, the index may change meanwhile."""
    for key in list(index):
        value = first(index, key)
        if value is not None:
            yield value


def member_of(groups_index: Index, group: str, user: str) -> bool:
    return any(user in members for members in groups_index.get(group, ()))


class Singles(Mapping[Any, Any]):
    """A kopf index (key -> store of values) read as key -> its one value."""

    def __init__(self, index: Index) -> None:
        self.index = index

    def __getitem__(self, key: Any) -> Any:
        value = first(self.index, key)
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[Any]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)
