"""Session bodies (SPEC §4) on the sending side: the one encoder of a body as the JSON bytes a
token binds and the ``?body=`` value a client appends. ``/start``, the client and the CLI use it;
the checks of a received body are the Rust core's (``_core.decode_body``,
``_core.check_body_json``). Imports nothing of wsgate."""

from __future__ import annotations

import base64
import json
from typing import Any

__all__ = ["encode_body"]


def encode_body(body: Any) -> tuple[bytes, str]:
    """A session body as compact JSON bytes and as the standard padded base64 that the
    client appends as ``?body=`` (and the upstream bot decodes). Raises ``ValueError`` for a
    value that JSON cannot hold (NaN, a set…)."""
    document = json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    data = document.encode()
    return data, base64.b64encode(data).decode("ascii")
