"""The parts of Starlette's WebSocket vocabulary that an in-process bot's code compares against.

Pipecat (and FastAPI code in general) checks ``websocket.client_state ==
WebSocketState.CONNECTED`` with Starlette's own enum and catches Starlette's
``WebSocketDisconnect``. When Starlette is importable these names *are* Starlette's, so such
comparisons and ``except`` clauses hold; without it, equivalents with the same names, values and
attributes stand in (Starlette is not a dependency of wsgate).

:class:`Headers` and :class:`QueryParams` are read-only mappings shaped like Starlette's
(case-insensitive header names, ``getlist``, ``multi_items``), built from the client's request.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

__all__ = ["Headers", "QueryParams", "WebSocketDisconnect", "WebSocketState"]


class WebSocketState(enum.Enum):
    """Starlette's ``WebSocketState``, names and values alike."""

    CONNECTING = 0
    CONNECTED = 1
    DISCONNECTED = 2
    RESPONSE = 3


class WebSocketDisconnect(Exception):
    """Starlette's ``WebSocketDisconnect``: the peer is gone (``code``, ``reason``)."""

    def __init__(self, code: int = 1000, reason: str | None = None) -> None:
        self.code = code
        self.reason = reason or ""


if not TYPE_CHECKING:  # pragma: no branch
    try:  # Starlette's own, so that `==` and `except` in Starlette-based code hold
        from starlette.websockets import WebSocketDisconnect, WebSocketState
    except ImportError:
        pass


class Headers(Mapping[str, str]):
    """The client's request headers: names looked up without regard to case, the first value
    of a repeated field by ``[]``/``get`` and all of them by :meth:`getlist` (as Starlette)."""

    def __init__(self, fields: Iterable[tuple[str, str]]) -> None:
        self._fields = [(name.lower(), value) for name, value in fields]

    def __getitem__(self, key: str) -> str:
        key = key.lower()
        for name, value in self._fields:
            if name == key:
                return value
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and any(name == key.lower() for name, _ in self._fields)

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(name for name, _ in self._fields))

    def __len__(self) -> int:
        return len(dict.fromkeys(name for name, _ in self._fields))

    def getlist(self, key: str) -> list[str]:
        """Every value of header ``key``, in order of appearance."""
        key = key.lower()
        return [value for name, value in self._fields if name == key]

    def multi_items(self) -> list[tuple[str, str]]:
        """Every ``(lower-cased name, value)`` field, repeats included, in order."""
        return list(self._fields)

    @property
    def raw(self) -> list[tuple[bytes, bytes]]:
        """The fields as ASGI has them: lower-cased names and values as latin-1 bytes."""
        return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in self._fields]

    def __repr__(self) -> str:
        # Values may hold credentials (Authorization, cookies): names only.
        return f"Headers({[name for name, _ in self._fields]!r})"


class QueryParams(Mapping[str, str]):
    """The request's query, decoded as Starlette decodes it (``+`` is a space, blanks kept)."""

    def __init__(self, query: str) -> None:
        self._items = parse_qsl(query, keep_blank_values=True)

    def __getitem__(self, key: str) -> str:
        # The last value of a repeated parameter, as Starlette's QueryParams.
        for name, value in reversed(self._items):
            if name == key:
                return value
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(name for name, _ in self._items))

    def __len__(self) -> int:
        return len(dict.fromkeys(name for name, _ in self._items))

    def getlist(self, key: str) -> list[str]:
        """Every value of parameter ``key``, in order."""
        return [value for name, value in self._items if name == key]

    def multi_items(self) -> list[tuple[str, str]]:
        """Every ``(name, value)`` pair, repeats included, in order."""
        return list(self._items)

    def __repr__(self) -> str:
        # Values may hold a token or a body: names only.
        return f"QueryParams({[name for name, _ in self._items]!r})"
