"""Serving a test's fake remote service on 127.0.0.1, on a free port."""

from __future__ import annotations

from aiohttp import web


async def build_info(request: web.Request) -> web.Response:
    """moshi-server's ``GET /api/build_info``: what health checks ask (a fake's)."""
    return web.json_response({"build_timestamp": "fake", "git_describe": "fake"})


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    """Start ``app``; returns its runner (``cleanup()`` it) and ``host:port``."""
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    return runner, f"{host}:{port}"
