"""`conveyor serve`: build the app, load the engine behind it, run uvicorn.

`ServerThread` runs a server inside this process (tests, benchmarks): it binds a port (0 for
any free one) and `start()` returns once uvicorn listens and the engine is loaded.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, Self

from conveyor.config import EngineConfig, ServerConfig
from conveyor.server.app import create_app
from conveyor.server.client import EngineClient
from conveyor.server.tool_sources import ToolSources, load_sources

GRACEFUL_SHUTDOWN_S = 10  # open connections get this long to finish once the server stops


def served_name(config: EngineConfig, server: ServerConfig) -> str:
    return server.served_model_name or Path(config.model.model.rstrip("/")).name or config.model.model


def engine_loader(
    config: EngineConfig,
    server: ServerConfig,
    tools: Iterable[Any] = (),
    engine_factory: Callable[..., Any] | None = None,
) -> Callable[[], tuple[EngineClient, dict, str, ToolSources]]:
    """The app's `load`: tool sources started (`tool_sources.load_sources`: MCP tools listed,
    `--tools` specs loaded; one that fails raises unless `--allow-missing-tools`), the engine
    opened (`backends.open_engine`, or `engine_factory(config, tools=...)`), its client started;
    returns (client, server tool specs by name, call parser kind, the tool sources)."""

    def load() -> tuple[EngineClient, dict, str, ToolSources]:
        from conveyor.backends import open_engine
        from conveyor.tools.base import ToolRegistry
        from conveyor.tools.parsers import default_format

        mcp, specs_kept, sources = load_sources(server.mcp, config.tools.tools, server.allow_missing_tools)
        engine_config = replace(config, tools=replace(config.tools, tools=specs_kept))
        extra = [*tools, *mcp]
        registry = ToolRegistry([*specs_kept, *extra])
        specs = {t.name: t.spec() for t in registry}
        engine = (engine_factory or open_engine)(engine_config, progress=False, tools=extra)
        parser = default_format(specs)
        return EngineClient(engine, server.prepare_timeout_s), specs, parser, sources

    return load


def build_app(
    config: EngineConfig,
    server: ServerConfig,
    load: Callable[[], tuple[EngineClient, dict, str]],
    on_fatal: Callable[[], None] | None = None,
) -> Any:
    key = server.api_key or os.environ.get("CONVEYOR_API_KEY", "")
    if key != server.api_key:
        server = replace(server, api_key=key)
    return create_app(load, server, served_name(config, server), on_fatal)


def serve(
    config: EngineConfig, server: ServerConfig, engine_factory: Callable[..., Any] | None = None
) -> None:
    """Run until interrupted (Ctrl-C stops uvicorn, then the engine and its tool workers). If
    start-up fails (a tool source, the model) or the engine thread dies, uvicorn stops and the
    process exits with status 1 and the error, so that a supervisor sees it or restarts it;
    open requests have already been answered with an error.
    `engine_factory`: as for `engine_loader` (the agents benchmark wraps the engine)."""
    import uvicorn

    holder: list[uvicorn.Server] = []
    load = engine_loader(config, server, engine_factory=engine_factory)
    app = build_app(config, server, load, on_fatal=lambda: _stop(holder[0]))
    holder.append(
        uvicorn.Server(
            uvicorn.Config(
                app,
                host=server.host,
                port=server.port,
                log_level="info",
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            )
        )
    )
    holder[0].run()
    state = app.state.conveyor
    if state.load_error is not None:
        raise SystemExit(f"conveyor serve: start-up failed: {state.load_error}")
    if state.client is not None and state.client.failed:
        raise SystemExit(f"conveyor serve: the engine failed: {state.client.failed}")


def _stop(server: Any) -> None:
    server.should_exit = True


class ServerThread:
    """A live server in a thread of this process, on loopback (see the module docstring)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        started = threading.Event()

        class _Server(uvicorn.Server):
            async def startup(self, sockets: Any = None) -> None:
                await super().startup(sockets)
                started.set()

        self.app = app
        self._started = started
        self._server = _Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
        self._thread = threading.Thread(target=self._server.run, name="conveyor-server", daemon=True)

    def start(self, timeout_s: float = 120.0) -> ServerThread:
        self._thread.start()
        if not self._started.wait(timeout_s):
            raise RuntimeError("the server did not start")
        if not self.app.state.conveyor.loaded.wait(timeout_s):
            raise RuntimeError("the engine did not load")
        return self

    @property
    def url(self) -> str:
        host, port = self._server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(60)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
