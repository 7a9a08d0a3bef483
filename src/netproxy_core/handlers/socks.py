"""SOCKS5 connection driver (SPEC §6)."""

from __future__ import annotations

import anyio.abc

from .context import ProxyContext


async def serve_socks_client(
    ctx: ProxyContext, stream: anyio.abc.ByteStream, client_addr: str | None
) -> None:
    await stream.aclose()
