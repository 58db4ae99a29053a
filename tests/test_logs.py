"""The log lines: the text format's time made once a second reads as ``logging``'s own default;
lines written straight to :func:`wsgate.logs.configure`'s handler, by Python or by the engine,
read as ``logging`` writes them."""

from __future__ import annotations

import io
import json
import logging
import re
import threading
from collections.abc import Callable, Iterator

import anyio
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.server import ServerConnection

from wsgate import Gateway, _core, logs, sessions
from wsgate.logs import TEXT_FORMAT, JsonFormatter, TextFormatter

from .helpers import Bot, Seen, connect, frame, in_thread, make_config, raw_socket
from .telephony import opening_messages


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


# --------------------------------------------------------------------------------------------
# A line written straight to configure()'s handler (write_info) reads as logging writes it.

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"


@pytest.fixture
def configured() -> Iterator[Callable[[str], io.StringIO]]:
    """configure() for the test, its handler writing to a buffer; logging as it was after."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logs._ours)

    def configure(log_format: str) -> io.StringIO:
        logs.configure("INFO", log_format)
        buffer = io.StringIO()
        assert logs._ours is not None
        logs._ours[0].setStream(buffer)
        return buffer

    yield configure
    root.handlers[:], logs._ours = saved[0], saved[2]
    root.setLevel(saved[1])


class Passing(logging.Filter):
    """A filter that lets every record through (but puts one on the way)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return True


FIELDS = {"agent": "echo.test", "session": 7, "duration": 1.5, "message": "not this one"}


def both_ways(buffer: io.StringIO) -> tuple[str, str]:
    """The same line written straight, then through logging (a filter on the way)."""
    log = logging.getLogger("wsgate")
    assert logs.write_info(log, "session_end", "session 7 ended", lambda: dict(FIELDS))
    log.addFilter(Passing())
    try:
        assert not logs.write_info(log, "session_end", "session 7 ended", lambda: dict(FIELDS))
        log.info("session %d ended", 7, extra={"event": "session_end", "fields": dict(FIELDS)})
    finally:
        log.filters.clear()
    straight, through = buffer.getvalue().splitlines()
    return straight, through


def test_a_text_line_written_straight_reads_as_logging_writes_it(
    configured: Callable[[str], io.StringIO],
) -> None:
    straight, through = both_ways(configured("text"))
    assert re.fullmatch(STAMP + " INFO session 7 ended", straight), straight
    assert straight[23:] == through[23:]  # all but the time


def test_a_json_line_written_straight_reads_as_logging_writes_it(
    configured: Callable[[str], io.StringIO],
) -> None:
    straight, through = (json.loads(line) for line in both_ways(configured("json")))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", straight.pop("ts"))
    through.pop("ts")
    assert straight == through
    assert straight["message"] == "session 7 ended" and straight["agent"] == "echo.test"


def test_with_another_handler_or_formatter_lines_go_through_logging(
    configured: Callable[[str], io.StringIO],
) -> None:
    log = logging.getLogger("wsgate")
    buffer = configured("text")
    other = logging.StreamHandler(io.StringIO())
    logging.getLogger().addHandler(other)
    assert not logs.write_info(log, "session_end", "x", dict)
    logging.getLogger().removeHandler(other)
    assert logs.write_info(log, "session_end", "x", dict)
    assert logs._ours is not None
    logs._ours[0].setFormatter(logging.Formatter("%(message)s"))  # an embedder's own format
    assert not logs.write_info(log, "session_end", "x", dict)
    assert len(buffer.getvalue().splitlines()) == 1


def writing_to(configured: Callable[[str], io.StringIO], stream: io.StringIO) -> None:
    """configure() for text lines, its handler writing to ``stream``."""
    configured("text")
    assert logs._ours is not None
    logs._ours[0].setStream(stream)


class Failing(io.StringIO):
    """A stream that takes a line, then fails (a pipe whose reader is too slow)."""

    def write(self, text: str) -> int:
        super().write(text)
        raise OSError(11, "Resource temporarily unavailable")


def test_a_stream_failing_mid_line_is_reported_not_written_twice(
    configured: Callable[[str], io.StringIO], capsys: pytest.CaptureFixture[str]
) -> None:
    failing = Failing()
    writing_to(configured, failing)
    assert logs.write_info(logging.getLogger("wsgate"), "session_end", "session 7 ended", dict)
    assert failing.getvalue().count("session 7 ended") == 1
    assert "Logging error" in capsys.readouterr().err  # as logging reports a failing stream


class Writes(io.StringIO):
    """A stream that records each write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def recorded(configured: Callable[[str], io.StringIO]) -> Writes:
    """configure() for text lines, its handler writing to a :class:`Writes`."""
    stream = Writes()
    writing_to(configured, stream)
    return stream


def test_lines_of_a_batch_go_out_in_one_write_in_order_with_other_records(
    configured: Callable[[str], io.StringIO],
) -> None:
    stream = recorded(configured)
    log = logging.getLogger("wsgate")
    with logs.batched():
        for n in (1, 2):
            assert logs.write_info(log, "session_end", f"session {n} ended", dict)
        assert stream.writes == [], "held until the block ends"
        log.warning("something else")  # the held lines go first
        with logs.batched():  # nested: one block
            assert logs.write_info(log, "session_end", "session 3 ended", dict)
        assert logs.write_info(log, "session_end", "session 4 ended", dict)
        assert len(stream.writes) == 2
    lines = [line.split(" ", 2)[2] for line in stream.getvalue().splitlines()]
    assert lines == [
        "INFO session 1 ended",
        "INFO session 2 ended",
        "WARNING something else",
        "INFO session 3 ended",
        "INFO session 4 ended",
    ]
    assert len(stream.writes) == 3, "the two held lines, the warning, the two last together"
    assert logs.write_info(log, "session_end", "session 5 ended", dict)
    assert len(stream.writes) == 4, "out of a batch, a line is written at once"


def test_a_stream_failing_at_the_end_of_a_batch_is_reported_once(
    configured: Callable[[str], io.StringIO], capsys: pytest.CaptureFixture[str]
) -> None:
    failing = Failing()
    writing_to(configured, failing)
    with logs.batched():
        for n in (1, 2):
            assert logs.write_info(logging.getLogger("wsgate"), "session_end", f"s{n} ended", dict)
    assert failing.getvalue().count("ended") == 2
    err = capsys.readouterr().err
    assert err.count("Logging error") == 1
    assert "session line(s) not written" in err and "Arguments: (2,)" in err
    assert "s1 ended" not in err  # not the lines again, to a stream that may be this one


def test_held_lines_go_to_the_stream_they_were_written_for(
    configured: Callable[[str], io.StringIO],
) -> None:
    log = logging.getLogger("wsgate")
    first = configured("text")
    with logs.batched():
        assert logs.write_info(log, "session_end", "session 1 ended", dict)
        assert logs._ours is not None
        reopened = io.StringIO()
        logs._ours[0].setStream(reopened)  # a log file reopened
        assert logs.write_info(log, "session_end", "session 2 ended", dict)
        second = configured("json")  # configured again, now for JSON lines
        assert logs.write_info(log, "session_end", "session 3 ended", lambda: {})
    assert first.getvalue().endswith("INFO session 1 ended\n")
    assert reopened.getvalue().endswith("INFO session 2 ended\n")
    assert json.loads(second.getvalue())["message"] == "session 3 ended"


def test_held_lines_go_out_in_writes_a_pipe_keeps_whole(
    configured: Callable[[str], io.StringIO],
) -> None:
    stream = recorded(configured)
    log = logging.getLogger("wsgate")
    with logs.batched():
        for n in range(100):
            assert logs.write_info(log, "session_end", f"session {n} ended " + "x" * 150, dict)
    assert all(len(w) <= 4096 for w in stream.writes)
    assert 1 < len(stream.writes) < 100
    ended = [line.split(" ")[4] for line in stream.getvalue().splitlines()]
    assert ended == [str(n) for n in range(100)]


# --------------------------------------------------------------------------------------------
# The lines the engine makes for the sessions it opened (rust/session_line.rs) read as Python's.


class Kept(logging.Handler):
    """Keeps every record."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def closing_with_4001(ws: ServerConnection, seen: Seen) -> None:
    """A bot that echoes, but closes with 4001 when told ``bye``."""
    for message in ws:
        if message == "bye":
            ws.close(4001, "as told")
            return
        ws.send(message)


def ended_in_many_ways(port: int) -> int:
    """Engine sessions of bot.test ending each a different way: how many."""
    url = f"ws://127.0.0.1:{port}"
    with connect(f"{url}/ws/generic/bot.test") as ws:  # the client closes, 1000
        ws.send("hello")
        assert ws.recv(10) == "hello"
    with connect(f"{url}/ws/generic/bot.test") as ws:  # the bot closes, 4001
        ws.send("bye")
        with pytest.raises(ConnectionClosed):
            ws.recv(10)
    with raw_socket(port) as sock:  # over max_message_size: the gateway's 1009
        sock.sendall(frame(0x2, b"x" * 2000))
        while sock.recv(4096):
            pass
    with raw_socket(port):  # the client leaves without a close: 1006
        pass
    with connect(f"{url}/ws/telnyx?serviceHost=bot.test") as ws:  # a provider's call
        opening = opening_messages("telnyx")
        for message in opening:  # both first: the gateway reads them before it relays
            ws.send(message)
        assert [ws.recv(10) for _ in opening] == opening
    return 5


def held_until_stopped(port: int, opened: threading.Event) -> None:
    """An engine session open until the gateway stops: its drain's 1001."""
    with connect(f"ws://127.0.0.1:{port}/ws/generic/bot.test") as ws:
        opened.set()
        with pytest.raises(ConnectionClosed):
            ws.recv(20)
        assert ws.close_code == 1001


@pytest.mark.anyio
async def test_the_engines_session_lines_read_as_python_writes_them(
    bot: Bot,
    configured: Callable[[str], io.StringIO],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    buffer = configured("text")
    told: list[_core.ToldEnds] = []

    def keeping(logger: logging.Logger, ends: _core.ToldEnds) -> bool:
        told.append(ends)
        return logs.write_session_lines(logger, ends)

    monkeypatch.setattr(sessions, "write_session_lines", keeping)
    bot.behaviour = closing_with_4001
    config = make_config(
        bot.url, engine_opens=True, max_message_size=1000, metrics=False, drain_timeout=0.1
    )
    async with anyio.create_task_group() as tg:
        async with Gateway(config).running() as gw:
            sessions_run = await in_thread(ended_in_many_ways, gw.port)
            opened = threading.Event()
            tg.start_soon(in_thread, held_until_stopped, gw.port, opened)
            assert await in_thread(opened.wait, 20)
    ends = [outcome for batch in told for outcome in batch.outcomes()]
    assert len(ends) == sessions_run + 1
    written = [line for line in buffer.getvalue().splitlines() if " INFO session " in line]

    # Each line as Python makes it: through logging (a filter on the way), kept.
    log = logging.getLogger("wsgate")
    kept = Kept()
    log.addHandler(kept)
    log.addFilter(Passing())
    try:
        for outcome in ends:
            assert outcome.opened is not None
            seconds = max(0.0, outcome.ended_at - outcome.opened.opened_at)
            sessions.log_outcome(sessions._Unadopted(outcome.opened), outcome, seconds)
    finally:
        log.removeHandler(kept)
        log.filters.clear()
    created = 1_764_668_581.125
    python_text = [r.getMessage() for r in kept.records]
    python_json = [
        logs._json_line(created, "info", "session_end", r.getMessage(), r.fields)  # type: ignore[attr-defined]
        for r in kept.records
    ]
    engine_text = "".join(c for b in told for c, _ in b.text("", "\n", 1 << 20)).splitlines()
    engine_json = "".join(
        c for b in told for c, _ in b.json(logs._timestamp(created), "\n", 1 << 20)
    ).splitlines()
    assert engine_text == python_text
    assert engine_json == python_json
    ended_by = {json.loads(line)["ended_by"] for line in engine_json}
    assert {"client", "bot", "gateway_limit", "gateway_drain"} <= ended_by, ended_by
    assert any(" via telnyx call " in line for line in engine_text), engine_text
    # And what the gateway wrote is those lines, after the time and level.
    assert [line[24 + len("INFO ") :] for line in written] == engine_text

    # To a stream that fails, the lines lost are counted, each once, held or not.
    assert logs._ours is not None
    logs._ours[0].setStream(Failing())
    capsys.readouterr()
    with logs.batched():
        for batch in told:
            assert logs.write_session_lines(log, batch)
    assert re.findall(r"Arguments: \((\d+),\)", capsys.readouterr().err) == [str(len(ends))]
    for batch in told:
        assert logs.write_session_lines(log, batch)
    lost = re.findall(r"Arguments: \((\d+),\)", capsys.readouterr().err)
    assert sum(map(int, lost)) == len(ends)
