"""Log lines: text (the default) or one JSON object per line (``[gateway] log_format = "json"``).

Every JSON line holds ``ts`` (UTC, RFC 3339 with milliseconds), ``level``, ``event`` (what
happened: ``session_end``, or ``log`` for a line without an event of its own), ``message`` (the
text line) and the event's own fields. A session's end (:func:`session_fields`) carries the agent,
session ids, provider and call id where known, who ended it, its close code, its duration and the
messages and bytes each way. As in text lines: never a token, a body, a peer's close reason or a
client address.

Fields reach a line as ``log.info(..., extra={"event": "...", "fields": {...}})``; the text
format ignores them.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from typing import Any

from . import _core
from .metrics import close_code_label, ended_by

__all__ = ["JsonFormatter", "TextFormatter", "configure", "session_fields"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(message)s"
# The keys every line has; an event's fields never replace them.
_BASE = ("ts", "level", "event", "message")


class TextFormatter(logging.Formatter):
    """``logging.Formatter`` with its default time (local, ``2026-12-02 10:43:01,123``), the
    date and time made once a second: a gateway writes a line per session, and each
    ``strftime`` of a local time costs a look at the time zone file."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        msec_format = self.default_msec_format or "%s,%03d"
        return msec_format % (_local_second(int(record.created)), record.msecs)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", "log"),
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            document.update((k, v) for k, v in fields.items() if k not in _BASE)
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False, default=str)


def configure(level: str = "INFO", log_format: str = "text") -> None:
    """Send the ``wsgate`` logs (and any other) to standard error as ``"text"`` or ``"json"``
    lines (what ``wsgate serve`` does)."""
    handler = logging.StreamHandler(sys.stderr)
    json_lines = log_format == "json"
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # What neither format shows is not gathered for each record (a line per session adds up):
    # the logging HOWTO's "Optimization" switches for the caller's file and line, the thread,
    # the process (a getpid call each) and the multiprocessing name.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def session_fields(
    outcome: _core.Outcome,
    *,
    agent: str,
    session_id: str,
    seconds: float,
    inprocess: bool,
    stopped: bool = False,
    provider: str | None = None,
    call_id: str | None = None,
) -> dict[str, Any]:
    """The fields of a ``session_end`` line (``ended_by`` and ``code`` as the metrics label
    them: docs/OPERATIONS.md)."""
    fields: dict[str, Any] = {
        "agent": agent,
        "session_id": session_id,
        "session": outcome.session_id,
        "ended_by": ended_by(outcome, inprocess, stopped),
        "detail": outcome.detail,
        "code": close_code_label(outcome.code),
        "client_close": None if outcome.client_close is None else outcome.client_close[0],
        "bot_close": None if outcome.bot_close is None else outcome.bot_close[0],
        "duration": round(seconds, 3),
        "messages_client_to_bot": outcome.messages_in,
        "bytes_client_to_bot": outcome.bytes_in,
        "messages_bot_to_client": outcome.messages_out,
        "bytes_bot_to_client": outcome.bytes_out,
    }
    if provider is not None:
        fields["provider"] = provider
        fields["call_id"] = call_id
    return fields


def _timestamp(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return _utc_second(seconds) + f".{millis:03d}Z"


@functools.lru_cache(maxsize=1)
def _local_second(seconds: int) -> str:
    return time.strftime(logging.Formatter.default_time_format, time.localtime(seconds))


@functools.lru_cache(maxsize=1)
def _utc_second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
