"""The linked relay engine: both transports of a tunnel driven by protocol callbacks.

Used by `relay.relay` when both ends are plain TCP streams of anyio's asyncio backend. The
engine borrows both transports by installing its own protocols (`_End`): a read is one
callback that writes straight to the other transport; a full send buffer (`adopt.HIGH_WATER`) pauses
reading on the other side; end of input is passed on as a half-close; one timer per event loop
keeps every link's idle clock (`_IdleClock`). An idle tunnel costs two small protocol objects
and the caller's waiting task — no task per direction, no watchdog. anyio's read queue and
events are dropped while a transport is borrowed and rebuilt when it is handed back — or,
when the relay closes its streams anyway (`close=True`), never rebuilt: the streams are
closed in place.

A transport another `Adopted` protocol holds already (the fast path's client) is taken over
from it (`held`) rather than handed back to anyio and borrowed again; so is an outbound
connection dialled straight into a `Dialled` protocol (`held_b`: no anyio stream at all).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from typing import Any, Final, cast

import anyio
import anyio.abc

from .adopt import Adopted
from .splice import AVAILABLE as _SPLICE
from .splice import SPLICE_AFTER, splice_until_eof

try:  # anyio's asyncio stream protocol (private API, as in `adopt`)
    from anyio._backends._asyncio import StreamProtocol as _AnyioProtocol
except ImportError:  # pragma: no cover - another anyio layout: streams are handed back
    _AnyioProtocol = None  # type: ignore[assignment,misc]

__all__ = ["Dialled", "FirstBytesCheck", "run_linked"]
_NO_DIRECTION = 2

# Sans-IO check of the first bytes of the a→b direction: called with every byte a sent so far
# and whether more can come (False) or not (True: end of input, or `first_bytes_timeout` after
# the first byte). Returns None for "need more", True to forward them, False to end the relay.
FirstBytesCheck = Callable[[bytes, bool], bool | None]


async def run_linked(
    a: Any,
    b: Any,
    prefix: bytes,
    *,
    idle_timeout: float,
    check: FirstBytesCheck | None,
    check_timeout: float,
    held: Adopted | None = None,
    held_b: Dialled | None = None,
    close: bool = False,
) -> tuple[int, int]:
    """Relay between two `adopt.adoptable` streams until done. `prefix`: bytes read from `a`
    already; `held`: the protocol that has borrowed `a`'s transport already (taken over, its
    unread bytes after `prefix`); `held_b`: `b` is a `Dialled` connection (`b` = its
    `stream`; needs `close`).

    On return both transports are handed back to their streams (the caller closes them), or
    with `close` both streams are closed (even if this raises).
    """
    assert held_b is None or (close and held_b.stream is b)
    link = _Link(a, b, idle_timeout, check, check_timeout)
    try:
        link.start(prefix, held, held_b)
        while not link.finished:  # callbacks do the work; this task waits (or splices)
            if link.splice_dir is not None and not link.spliced:
                link.spliced = True
                await link.splice(link.splice_dir)
            else:
                link.waiter = link.loop.create_future()
                await link.waiter
    finally:
        link.release(close)
    return link.counts[0], link.counts[1]


class _End(Adopted):
    """One borrowed transport of a `_Link` (its reads go straight to the link)."""

    __slots__ = ("index", "link")

    def __init__(self, link: _Link, index: int, stream: Any) -> None:
        super().__init__(stream)
        self.link = link
        self.index = index

    def borrow(self) -> bytes:
        """Install this protocol (not reading yet); returns what anyio had read already."""
        self.adopt(read=False)
        pending = bytes(self.buffer)
        self.buffer.clear()
        return pending

    def take_over(self, held: Adopted) -> bytes:
        """Take the transport from `held`, which borrowed it from the same stream already;
        returns `held`'s unread bytes (`held.restore()` then has nothing to do)."""
        assert held.stream is self.stream and held.adopted
        self.saved, held.saved = held.saved, None
        self.eof, self.lost, self.error = held.eof, held.lost, held.error
        self.write_paused, self.reading = held.write_paused, held.reading
        pending = bytes(held.buffer)
        held.buffer.clear()
        self.transport.set_protocol(self)
        return pending

    def give_back(self, close: bool) -> None:
        """Hand the transport back to its stream, or (`close`) close both in place."""
        if not close or _CLOSED is None:
            self.restore()
            if close:
                self.stream._closed = True
                self.transport.abort()
            return
        if self.saved is None:  # not borrowed: an ordinary close
            self.stream._closed = True
            self.transport.abort()
            return
        # No rebuilding anyio's queue and events only to close: the stream gets a closed
        # stand-in protocol (its calls raise ClosedResourceError), the transport is aborted as
        # anyio's `aclose` would (its `connection_lost` comes to this protocol, and is ignored).
        self.saved = None
        self.reading = False
        self.stream._protocol = _CLOSED
        self.stream._closed = True
        self.transport.abort()

    def fd(self) -> int:
        return int(self.transport.get_extra_info("socket").fileno())

    # asyncio.Protocol
    def data_received(self, data: bytes) -> None:
        self.link.received(self.index, data)

    def eof_received(self) -> bool:
        self.eof = True
        self.link.ended(self.index)
        return True  # keep our write side open (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost, self.error, self.reading = True, exc, False
        self.link.finish()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.link.update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.link.update_reading()
        if self.link.draining:
            self.link.writable()


class _Link:
    """Both directions of one tunnel driven by transport callbacks (see the module doc)."""

    __slots__ = (
        "check",
        "check_buffer",
        "check_timeout",
        "check_timer",
        "counts",
        "draining",
        "ends",
        "eofs",
        "finished",
        "idle_timeout",
        "last",
        "loop",
        "scope",
        "splice_dir",
        "spliced",
        "waiter",
    )

    def __init__(
        self,
        a: Any,
        b: Any,
        idle_timeout: float,
        check: FirstBytesCheck | None,
        check_timeout: float,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.ends = (_End(self, 0, a), _End(self, 1, b))
        self.idle_timeout = idle_timeout
        self.check = check
        self.check_timeout = check_timeout
        self.check_buffer = b""
        self.check_timer: asyncio.TimerHandle | None = None
        self.counts = [0, 0]
        self.eofs = 0
        self.finished = False
        self.draining = False
        self.last = self.loop.time()
        self.waiter: asyncio.Future[None] | None = None
        self.scope: anyio.CancelScope | None = None
        self.splice_dir: int | None = None  # the direction moved by splice(2), once per relay
        self.spliced = False

    def start(
        self, prefix: bytes, held: Adopted | None = None, held_b: Adopted | None = None
    ) -> None:
        """Borrow both transports (or take them over from `held`, `held_b`) and take in what
        was read before."""
        first = self.ends[0].borrow() if held is None else self.ends[0].take_over(held)
        second = self.ends[1].borrow() if held_b is None else self.ends[1].take_over(held_b)
        pending = (prefix + first, second)
        if math.isfinite(self.idle_timeout):
            _IdleClock.watch(self)
        for index in (0, 1):
            if pending[index]:
                self.received(index, pending[index])
            if self.ends[index].eof and not self.finished:
                self.ended(index)
        if self.ends[0].lost or self.ends[1].lost:  # lost while held: as `connection_lost`
            self.finish()
        self.update_reading()

    def release(self, close: bool = False) -> None:
        """Stop (if not already) and hand both transports back to their anyio streams, or
        (`close`) close both streams."""
        self.finish()
        for end in self.ends:
            end.give_back(close)

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        _IdleClock.forget(self)
        if self.check_timer is not None:
            self.check_timer.cancel()
            self.check_timer = None
        for end in self.ends:
            end.set_reading(False)
        if self.scope is not None:
            self.scope.cancel()
        self._wake()

    def _wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def update_reading(self) -> None:
        if self.finished:
            return
        for index, end in enumerate(self.ends):
            peer = self.ends[1 - index]
            end.set_reading(not end.eof and not peer.write_paused and self.splice_dir != index)

    # --- callbacks ----------------------------------------------------------------------------

    def received(self, index: int, data: bytes) -> None:
        if self.finished:
            return
        self.last = self.loop.time()
        if index == 0 and self.check is not None:
            if not self.check_buffer and math.isfinite(self.check_timeout):
                self.check_timer = self.loop.call_later(self.check_timeout, self._checked, True)
            self.check_buffer += data
            self._checked(False)
            return
        self._forward(index, data)

    def ended(self, index: int) -> None:
        """End of input on end `index`: pass it on as a half-close."""
        if self.finished:
            return
        self.ends[index].set_reading(False)
        if index == 0 and self.check is not None:
            self._checked(True)
            return
        dst = self.ends[1 - index]
        try:
            dst.transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            self.finish()
            return
        self.eofs += 1
        if self.eofs == 2:
            self._drain()

    def _checked(self, final: bool) -> None:
        assert self.check is not None
        if self.finished:
            return
        verdict = self.check(self.check_buffer, final)
        if verdict is None:
            if not final:
                return
            verdict = False  # a check that cannot decide at the end refuses
        if self.check_timer is not None:
            self.check_timer.cancel()
            self.check_timer = None
        data, self.check, self.check_buffer = self.check_buffer, None, b""
        if not verdict:
            self.finish()
            return
        if data:
            self._forward(0, data)
        if self.ends[0].eof:
            self.ended(0)

    def _forward(self, index: int, data: bytes) -> None:
        self.counts[index] += len(data)
        dst = self.ends[1 - index].transport
        try:
            dst.write(data)
        except RuntimeError:  # closed, its connection_lost not delivered yet
            self.finish()
            return
        if (
            _SPLICE
            and len(data) >= SPLICE_AFTER
            and self.splice_dir is None
            and not dst.get_write_buffer_size()
        ):
            self.splice_dir = index  # the run loop takes over this direction
            src = self.ends[index]
            src.set_reading(False)
            self._wake()

    def _drain(self) -> None:
        """Both directions ended: finish once everything written has left user space."""
        self.draining = True
        busy = False
        for end in self.ends:
            if not end.lost and end.transport.get_write_buffer_size():
                busy = True
                end.transport.set_write_buffer_limits(0)  # resume_writing only when empty
        if not busy:
            self.finish()

    def writable(self) -> None:
        if self.draining and not any(
            not end.lost and end.transport.get_write_buffer_size() for end in self.ends
        ):
            self.finish()

    # --- splice -------------------------------------------------------------------------------

    async def splice(self, index: int) -> None:
        """Move direction `index` with splice(2) until its end of input (or the relay's)."""
        src, dst = self.ends[index], self.ends[1 - index]
        try:
            fds = src.fd(), dst.fd()
        except (AttributeError, OSError, ValueError):
            fds = (-1, -1)
        if min(fds) < 0:
            self.splice_dir = _NO_DIRECTION  # cannot: back to copying
            self.update_reading()
            return
        failed = False
        with anyio.CancelScope() as scope:
            self.scope = scope
            try:
                await splice_until_eof(fds[0], fds[1], self.counts, index, self._touch)
            except OSError:
                failed = True
        self.scope = None
        if failed:
            self.finish()
        elif not self.finished:
            src.eof = True
            self.ended(index)

    def _touch(self) -> None:
        self.last = self.loop.time()


class _IdleClock:
    """The idle deadline of every linked relay on one event loop, kept by one timer.

    A timer per tunnel costs more memory than the rest of an idle tunnel's relay; instead
    one loop timer ticks while links exist and ends those idle for their `idle_timeout`. The
    tick is an eighth of the shortest timeout watched (10 ms to 1 s), so a link ends at most
    that late. The clock outlives its last link by up to one tick: short tunnels one after
    another (sequential set-ups) then share one timer rather than each making and cancelling
    its own (12 µs of a 450 µs set-up).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.links: dict[_Link, None] = {}
        self.tick = math.inf
        self.timer: asyncio.TimerHandle | None = None

    @staticmethod
    def watch(link: _Link) -> None:
        clock = _clocks.get(link.loop)
        if clock is None:
            for stale in [loop for loop in _clocks if loop.is_closed()]:
                del _clocks[stale]  # a loop closed within a tick of its last link
            clock = _clocks[link.loop] = _IdleClock(link.loop)
        clock.links[link] = None
        tick = _tick(link.idle_timeout)
        if tick < clock.tick:
            clock.tick = tick
            if clock.timer is not None:
                clock.timer.cancel()
            clock.timer = clock.loop.call_later(tick, clock._check)

    @staticmethod
    def forget(link: _Link) -> None:
        """Stop watching `link`; the timer runs on to its next tick (see `_check`)."""
        clock = _clocks.get(link.loop)
        if clock is not None:
            clock.links.pop(link, None)

    def _check(self) -> None:
        self.timer = None
        now = self.loop.time()
        for link in [link for link in self.links if link.last + link.idle_timeout <= now]:
            link.finish()  # forgets it
        self.tick = min((_tick(link.idle_timeout) for link in self.links), default=math.inf)
        if self.links:
            self.timer = self.loop.call_later(self.tick, self._check)
        elif _clocks.get(self.loop) is self:
            del _clocks[self.loop]  # no link left: no timer and no clock


_clocks: dict[asyncio.AbstractEventLoop, _IdleClock] = {}


def _tick(idle_timeout: float) -> float:
    return min(1.0, max(0.01, idle_timeout / 8))


class Dialled(Adopted):
    """An outbound TCP connection dialled straight into this protocol (`dial.dial_protocol`),
    with no anyio stream: it holds what arrives until `run_linked(..., held_b=)` takes it
    over; `close` it if nothing does. It reads until its first chunk arrives, then pauses
    (the rest waits in the socket): no pause and resume for the usual silent origin.
    `connected` is called once the connection is made (before the dialling task resumes)."""

    __slots__ = ("connected",)

    def __init__(self, connected: Callable[[], None] | None = None) -> None:
        self.connected = connected  # the rest is set up by `connection_made`

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Adopted.__init__(self, cast(Any, _Bare(transport)))
        self.saved = _HELD  # borrowed from no one: what a link takes over
        self.reading = True  # a new transport reads (uvloop starts it after this call)
        if self.connected is not None:
            self.connected()

    def data_received(self, data: bytes) -> None:  # (a link's protocol reads once it took over)
        self.buffer += data
        self.set_reading(False)

    @property
    def local_addr(self) -> tuple[str, int] | None:
        """Our end of the connection (SOCKS reports it as BND.ADDR)."""
        address = self.transport.get_extra_info("sockname")
        if isinstance(address, tuple) and len(address) >= 2:
            return str(address[0]), int(address[1])
        return None

    def close(self) -> None:
        self.saved = None
        if not self.stream._closed:
            self.stream._closed = True
            self.transport.abort()


class _Bare:
    """What a `Dialled` protocol has for a stream: its transport and a closed flag."""

    __slots__ = ("_closed", "_protocol", "_transport")

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._protocol: Any = None
        self._closed = False


_HELD: Final = object()


def _closed_protocol() -> Any:
    """A stand-in protocol for an anyio stream closed in place: empty, at rest, never attached
    to a transport (so shared): `receive` and `send` find the stream closed."""
    if _AnyioProtocol is None:  # pragma: no cover
        return None
    protocol = _AnyioProtocol()
    protocol.read_queue = deque()
    protocol.read_event = asyncio.Event()
    protocol.read_event.set()
    protocol.write_event = asyncio.Event()
    protocol.write_event.set()
    return protocol


_CLOSED = _closed_protocol()
