"""wsgate: a self-hostable WebSocket relay gateway, wire-compatible with Pipecat Cloud's generic
WebSocket endpoint. Python control plane on anyio (asyncio or trio), Rust data plane.

    import anyio, wsgate

    async def main() -> None:
        gateway = wsgate.Gateway(wsgate.default_config().replace_gateway(port=0))
        async with gateway.running():
            print(gateway.url + "/ws/generic/echo.demo")
            ...

    anyio.run(main)
"""

import inspect

from ._core import Outcome
from .authorize import SessionRequest
from .config import (
    AgentConfig,
    Config,
    GatewaySettings,
    OrgConfig,
    default_config,
    load_config,
    loads_config,
)
from .embed import Relayer, accept_upgrade, relay
from .errors import ConfigError, HttpError, WsgateError
from .inprocess import BotArguments, InProcessWebSocket, WebSocketDisconnect, WebSocketState
from .server import Gateway
from .session_routes import RouteRequest, RouteResponse, Routes

__all__ = [
    "AgentConfig",
    "BotArguments",
    "Config",
    "ConfigError",
    "Gateway",
    "GatewaySettings",
    "HttpError",
    "InProcessWebSocket",
    "OrgConfig",
    "Outcome",
    "Relayer",
    "RouteRequest",
    "RouteResponse",
    "Routes",
    "SessionRequest",
    "WebSocketDisconnect",
    "WebSocketState",
    "WsgateError",
    "accept_upgrade",
    "default_config",
    "load_config",
    "loads_config",
    "relay",
]

# Show public names as wsgate.X (in reprs, tracebacks and docs), as anyio and httpx do.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("wsgate.") and not inspect.ismethod(_obj):
        _obj.__module__ = __name__
del _name, _obj, inspect
