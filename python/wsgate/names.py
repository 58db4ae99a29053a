"""Names of agents, organisations and service hosts (SPEC §1): the one place their pattern is
written, for the settings, routing, ``/start`` and the client alike. Imports nothing of wsgate
but its errors."""

from __future__ import annotations

import re

from .errors import ConfigError

__all__ = ["NAME", "SERVICE_HOST", "check_name", "is_name", "is_service_host"]

#: An agent or organisation name (ours): 1-63 lowercase letters, digits or ``-``.
NAME = re.compile(r"[a-z0-9-]{1,63}")
#: ``{agent}.{org}``.
SERVICE_HOST = re.compile(rf"({NAME.pattern})\.({NAME.pattern})")


def is_name(text: str) -> bool:
    """Whether ``text`` is a valid agent or organisation name."""
    return NAME.fullmatch(text) is not None


def is_service_host(text: str) -> bool:
    """Whether ``text`` is ``{agent}.{org}`` with two valid names."""
    return SERVICE_HOST.fullmatch(text) is not None


def check_name(kind: str, name: object) -> None:
    """Raise :class:`ConfigError` unless ``name`` is a valid agent or organisation name."""
    if not isinstance(name, str) or not is_name(name):
        raise ConfigError(f"{kind} name {name!r} must be 1-63 lowercase letters, digits or '-'")
