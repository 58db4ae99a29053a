"""``wsgate status``: a gateway's ``/metrics`` as a compact table per agent, what an operator
types first when paged.

Two scrapes ``interval`` seconds apart (read with ``prometheus_client.parser``): the second gives
the totals, the difference the rates. Per agent: sessions active and opened, refusals by status,
the p50/p99 of session durations (estimated from the histogram's buckets, as PromQL's
``histogram_quantile`` does), messages per second both ways together. The rows are the agents
the gateway counts; ``(unknown)`` gathers refusals of requests that named no agent it knows.
"""

from __future__ import annotations

import math
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

__all__ = ["Snapshot", "fetch", "parse", "render", "status"]

_TIMEOUT = 5.0


@dataclass
class Agent:
    """One agent's figures in a scrape."""

    active: float = 0
    opened: float = 0
    refused: dict[str, float] = field(default_factory=dict)
    messages: float = 0
    #: Cumulative counts of the duration histogram by upper bound.
    buckets: dict[float, float] = field(default_factory=dict)


@dataclass
class Snapshot:
    """What one scrape says."""

    agents: dict[str, Agent] = field(default_factory=lambda: defaultdict(Agent))
    connections: float = 0
    pending: float = 0
    draining: bool = False
    version: str = "?"


def fetch(url: str) -> str:
    """The text of ``{url}/metrics`` (``url`` as given to ``--url``: the gateway or its
    metrics listener)."""
    with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=_TIMEOUT) as answer:
        text: str = answer.read().decode("utf-8")
    return text


def parse(text: str) -> Snapshot:
    """The figures of one scrape."""
    snap = Snapshot()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            _take(snap, sample)
    return snap


def _take(snap: Snapshot, s: Sample) -> None:
    name, labels, value = s.name, s.labels, s.value
    if name == "wsgate_connections_open":
        snap.connections = value
    elif name == "wsgate_upgrades_pending":
        snap.pending = value
    elif name == "wsgate_draining":
        snap.draining = value > 0
    elif name == "wsgate_build_info":
        snap.version = labels.get("version", "?")
    elif name == "wsgate_sessions_active":
        snap.agents[labels["agent"]].active += value
    elif name == "wsgate_sessions_opened_total":
        snap.agents[labels["agent"]].opened = value
    elif name == "wsgate_upgrades_refused_total":
        snap.agents[labels["agent"]].refused[labels["status"]] = value
    elif name == "wsgate_messages_total":
        snap.agents[labels["agent"]].messages += value
    elif name == "wsgate_session_duration_seconds_bucket":
        snap.agents[labels["agent"]].buckets[float(labels["le"])] = value


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The ``q`` quantile of a histogram's cumulative ``buckets``, interpolated linearly within
    its bucket; None without observations. In the ``+Inf`` bucket: the largest finite bound."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def render(first: Snapshot, second: Snapshot | None, seconds: float) -> str:
    """The table: totals from the last scrape, rates between the two (none with one)."""
    last = second or first
    state = "draining" if last.draining else "serving"
    lines = [
        f"wsgate {last.version}, {state}: {last.connections:.0f} connections, "
        f"{last.pending:.0f} upgrades pending",
        "",
    ]
    header = ("agent", "active", "opened", "refused", "p50", "p99", "msgs/s")
    rows = [header]
    for name in sorted(last.agents, key=lambda n: (n == "", n)):
        now = last.agents[name]
        if name == "" and not now.refused:
            continue
        rate = "-"
        if second is not None and seconds > 0:
            before = first.agents[name].messages if name in first.agents else 0.0
            rate = f"{(now.messages - before) / seconds:.0f}"
        refused = " ".join(f"{status}:{n:.0f}" for status, n in sorted(now.refused.items()))
        rows.append(
            (
                name or "(unknown)",
                f"{now.active:.0f}",
                f"{now.opened:.0f}",
                refused or "-",
                _duration(quantile(0.5, now.buckets)),
                _duration(quantile(0.99, now.buckets)),
                rate,
            )
        )
    lines += _columns(rows)
    return "\n".join(lines)


def status(url: str, interval: float = 1.0) -> str:
    """Scrape ``url`` (twice, ``interval`` seconds apart, for the rates) and render it."""
    first = parse(fetch(url))
    if interval <= 0:
        return render(first, None, 0)
    started = time.monotonic()
    time.sleep(interval)
    second = parse(fetch(url))
    return render(first, second, time.monotonic() - started)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def _columns(rows: Sequence[Sequence[str]]) -> Iterable[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        yield "  ".join(cells).rstrip()
