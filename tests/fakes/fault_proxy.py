"""A TCP proxy on loopback that hurts chosen connections, for fault-injection tests.

    server under test ──TCP──▶ FaultProxy(127.0.0.1:port) ──TCP──▶ backend (a fake)
                                 │ each accepted connection is a ``Link``;
                                 │ ``arm(fault, connections=N)``: the next N links get it
                                 └ ``hurt(link, fault)``: a live link gets it now

Faults (a link has at most one at a time; ``after`` counts bytes *from the backend*,
from the moment the fault applies, so a reply can be hurt in its middle):

    Latency(s)       every chunk, both ways, arrives ``s`` seconds late (order kept,
                     throughput not: chunks are delayed, not serialised)
    Stall(after)     then nothing more is forwarded either way; both sockets stay
                     open (the client's bytes are read and dropped, so its leaving is
                     still noticed), as a hung backend or a black-holed route
    Cut(after)       then both connections are closed cleanly (FIN): the reply ends
                     without its end
    Reset(after)     then both connections are reset (RST, via SO_LINGER 0)
    Refuse()         reset at accept, before a byte: the client's connect or
                     handshake fails with "connection reset by peer"

``down()`` closes the listening socket itself (connects get ECONNREFUSED) until
``up()``. The proxy keeps counts for the tests: ``links`` (every link, in order),
``open_links``; ``close()`` closes everything it holds.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import struct
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Latency:
    seconds: float


@dataclass(frozen=True)
class Stall:
    after: int = 0


@dataclass(frozen=True)
class Cut:
    after: int = 0


@dataclass(frozen=True)
class Reset:
    after: int = 0


@dataclass(frozen=True)
class Refuse:
    pass


Fault = Latency | Stall | Cut | Reset | Refuse

CHUNK = 64 * 1024
_CLOSE = None
"""Queued after the last chunk of a direction: the writer then ends the link."""


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST: linger on, timeout 0."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Link:
    """One proxied connection: the client's side and the backend's."""

    def __init__(self, proxy: FaultProxy, index: int, fault: Fault | None) -> None:
        self.proxy = proxy
        self.index = index
        self.fault: Fault | None = None
        self.from_backend = 0
        """Bytes the backend sent so far (forwarded or not)."""
        self.to_backend = 0
        self.forwarded = 0
        """Bytes from the backend that reached the client."""
        self.stalled = False
        self.ended = asyncio.Event()
        self.how: str = "open"
        """How it ended: "closed", "cut", "reset", "refused", "failed to connect"."""
        self._limit: int | None = None
        """Forward from the backend up to this ``forwarded`` count, then act."""
        self._client: asyncio.StreamWriter | None = None
        self._backend: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task[None]] = []
        if fault is not None:
            self.apply(fault)

    def apply(self, fault: Fault | None) -> None:
        """Give the link ``fault`` from now on (None: heal it, except a stall)."""
        self.fault = fault
        match fault:
            case Stall(after) | Cut(after) | Reset(after):
                self._limit = self.forwarded + after
                if after == 0 and self._client is not None:
                    self._act()
            case _:
                self._limit = None

    async def run(self, client_reader: asyncio.StreamReader,
                  client: asyncio.StreamWriter) -> None:
        self._client = client
        if isinstance(self.fault, Refuse):
            self._end("refused", reset=True)
            return
        try:
            backend_reader, self._backend = await asyncio.open_connection(
                self.proxy.host, self.proxy.backend_port)
        except OSError:
            self._end("failed to connect", reset=True)
            return
        if self._limit is not None and self._limit <= self.forwarded:
            self._act()
            if self.ended.is_set():
                return
        up: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        down: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        self._tasks = [
            asyncio.create_task(self._read(client_reader, up, upstream=True)),
            asyncio.create_task(self._write(up, self._backend, upstream=True)),
            asyncio.create_task(self._read(backend_reader, down, upstream=False)),
            asyncio.create_task(self._write(down, client, upstream=False)),
        ]
        await self.ended.wait()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ── the pumps ────────────────────────────────────────────────────────────

    def _delay(self) -> float:
        return self.fault.seconds if isinstance(self.fault, Latency) else 0.0

    async def _read(self, reader: asyncio.StreamReader,
                    queue: asyncio.Queue[tuple[float, bytes] | None], *, upstream: bool) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not upstream and self.stalled:
                    await self.ended.wait()  # the backend is not read: it stays blocked
                    return
                data = await reader.read(CHUNK)
                if not data:
                    break
                if upstream:
                    self.to_backend += len(data)
                    if self.stalled:
                        continue  # dropped: only the client's leaving matters now
                else:
                    self.from_backend += len(data)
                queue.put_nowait((loop.time() + self._delay(), data))
        except OSError:
            pass
        queue.put_nowait(_CLOSE)

    async def _write(self, queue: asyncio.Queue[tuple[float, bytes] | None],
                     writer: asyncio.StreamWriter, *, upstream: bool) -> None:
        loop = asyncio.get_running_loop()
        try:
            while (item := await queue.get()) is not _CLOSE:
                due, data = item
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                if self.stalled:
                    continue
                if not upstream and self._limit is not None:
                    allowed = self._limit - self.forwarded
                    if allowed < len(data):
                        data = data[:max(allowed, 0)]
                        if data:
                            writer.write(data)
                            self.forwarded += len(data)
                            await writer.drain()
                        self._act()
                        if self.ended.is_set():
                            return
                        continue
                writer.write(data)
                if not upstream:
                    self.forwarded += len(data)
                await writer.drain()
        except OSError:
            pass
        self._end("closed")

    # ── faults and the end ───────────────────────────────────────────────────

    def _act(self) -> None:
        """The fault's moment has come: stall, cut or reset."""
        match self.fault:
            case Stall():
                self.stalled = True
            case Cut():
                self._end("cut", reset=False)
            case Reset():
                self._end("reset", reset=True)

    def _end(self, how: str, *, reset: bool = False) -> None:
        if self.ended.is_set():
            return
        self.how = how
        for writer in (self._client, self._backend):
            if writer is None:
                continue
            if reset:
                _reset(writer)
            else:
                writer.close()
        self.ended.set()


class FaultProxy:
    """Listens on 127.0.0.1 (a free port) and forwards to ``backend_port``."""

    def __init__(self, backend_port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.backend_port = backend_port
        self.port = 0
        self.links: list[Link] = []
        self._armed: collections.deque[Fault] = collections.deque()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._accepted = asyncio.Event()

    @classmethod
    async def before(cls, url: str) -> tuple[FaultProxy, str]:
        """A started proxy in front of the backend at ``url``; returns it and ``url``
        with the proxy's port instead."""
        scheme, rest = url.split("://", 1)
        address, _, path = rest.partition("/")
        host, _, port = address.rpartition(":")
        proxy = cls(int(port), host)
        await proxy.start()
        return proxy, f"{scheme}://{host}:{proxy.port}" + (f"/{path}" if path else "")

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port or 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def arm(self, fault: Fault, connections: int = 1) -> None:
        """The next ``connections`` links get ``fault`` (after earlier armed ones)."""
        self._armed.extend([fault] * connections)

    def disarm(self) -> None:
        self._armed.clear()

    @property
    def armed(self) -> int:
        return len(self._armed)

    def hurt(self, link: Link, fault: Fault) -> None:
        """Give a live link ``fault`` now; ``after`` counts from now."""
        link.apply(fault)

    def hurt_all(self, fault: Fault) -> list[Link]:
        """Every open link gets ``fault`` now; returns them."""
        live = [link for link in self.links if not link.ended.is_set()]
        for link in live:
            link.apply(fault)
        return live

    @property
    def open_links(self) -> list[Link]:
        return [link for link in self.links if not link.ended.is_set()]

    async def wait_for_links(self, count: int, within: float) -> list[Link]:
        """Until ``count`` links were accepted in all; raises ``TimeoutError``."""
        async with asyncio.timeout(within):
            while len(self.links) < count:
                self._accepted.clear()
                await self._accepted.wait()
        return self.links

    async def down(self) -> None:
        """Stop listening: connects are refused by the kernel until ``up()``."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def up(self) -> None:
        if self._server is None:
            await self.start()

    async def close(self) -> None:
        await self.down()
        for link in self.links:
            link._end("closed", reset=True)
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        fault = self._armed.popleft() if self._armed else None
        link = Link(self, len(self.links), fault)
        self.links.append(link)
        self._accepted.set()
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await link.run(reader, writer)
        finally:
            link._end("closed")
            self._handlers.discard(task)


def summary(proxy: FaultProxy) -> dict[str, Any]:
    """How the proxy's links ended, counted: ``{"closed": 3, "cut": 1}``."""
    return dict(collections.Counter(link.how for link in proxy.links))
