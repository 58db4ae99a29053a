"""The text log format: its time made once a second reads as ``logging``'s own default."""

from __future__ import annotations

import logging

from wsgate.logs import TEXT_FORMAT, JsonFormatter, TextFormatter


def record(created: float) -> logging.LogRecord:
    r = logging.LogRecord("wsgate", logging.INFO, __file__, 1, "session %d ended", (7,), None)
    r.created, r.msecs = created, (created - int(created)) * 1000
    return r


def test_text_lines_read_as_the_standard_formatter_writes_them() -> None:
    ours, standard = TextFormatter(TEXT_FORMAT), logging.Formatter(TEXT_FORMAT)
    # Within one second, across a second, and back to an earlier one (a clock stepped back).
    for created in (1_764_668_581.125, 1_764_668_581.875, 1_764_668_582.5, 1_700_000_000.25):
        line = ours.format(record(created))
        assert line == standard.format(record(created))
        assert line.endswith(" INFO session 7 ended")


def test_json_lines_carry_the_utc_time_to_the_millisecond() -> None:
    formatter = JsonFormatter()
    assert '"ts": "2025-12-02T09:43:01.125Z"' in formatter.format(record(1_764_668_581.125))
    assert '"ts": "2025-12-02T09:43:02.500Z"' in formatter.format(record(1_764_668_582.5))
    assert '"ts": "2023-11-14T22:13:20.250Z"' in formatter.format(record(1_700_000_000.25))
