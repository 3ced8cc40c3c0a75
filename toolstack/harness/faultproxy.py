"""A TCP proxy that puts faults between two migration daemons.

Every connection accepted on `.port` is proxied to the target on its own pair
of threads, one per direction: "up" is client -> target (the source daemon
talking to the destination), "down" is target -> client.  Faults can be
injected at any time from any thread:

- `reset()` aborts every current connection (both peers see ECONNRESET) and
  `cut()` closes every current one in order (both peers see EOF).  Neither
  outlives the call: the next connection is proxied normally.
- `stall(direction)` stops forwarding (the proxy stops reading, so bytes stay
  queued in the kernel and the senders' buffers fill up) without closing
  anything, and `slow(bytes_per_s, direction)` rate-limits; both are states of
  the link, so they apply to connections accepted later too, until
  `resume()`, `slow(None)` or `heal()`.
- `after_bytes(n, fault, direction)` fires `fault` once exactly `n` more bytes
  have passed in `direction` on a connection; `refuse_new(True)` resets new
  connections as soon as they are accepted.  `heal()` clears every state and
  armed fault.

Faults take effect before the call returns: every byte is sent under the
proxy's lock, so not one passes a stall after `stall()` returns, a new rate
applies from the next byte and `after_bytes` counts from an exact one; and
`reset()` and `cut()` return once the connections they hit are closed.

Plain threads and sockets (no trio), so the proxy runs inside any test, async
or not, or on its own in another process.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

DIRECTIONS = ("up", "down")
FAULTS = ("reset", "cut", "stall")
CHUNK = 256 * 1024  # per read: big enough for loopback throughput, small enough to hold
IDLE = 0.25  # every poll ends this often, so a lost wake-up costs no more than this
FAULT_DEADLINE = 10.0  # for reset() and cut() to see their connections closed
CLOSE_DEADLINE = 10.0  # for close() to join every thread
NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)


class _End(Exception):
    """This pump is done: end of stream, an error on the connection, or a fault."""


class _Waker:
    """A pipe that wakes one thread out of poll(), which can't wait on a threading.Event."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        # Another thread may wake us while we close: never write to a closed (reused) fd.
        self._lock = threading.Lock()
        self._closed = False

    def fileno(self) -> int:
        return self._read

    def wake(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self._write, b"!")
            except BlockingIOError:
                pass  # the pipe is full, so the thread will wake anyway

    def drain(self) -> None:
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._read)
                os.close(self._write)


class _Bucket:
    """A token bucket of `rate` bytes/s.  Bursts are at most 1/20 s of traffic and
    sends at least a quarter of that, so a slow link trickles smoothly instead of
    pausing for a second and then bursting, and a pump wakes ~80 times a second."""

    def __init__(self, rate: float) -> None:
        self.rate = float(rate)
        self.burst = max(1, int(self.rate / 20))
        self.quantum = max(1, self.burst // 4)
        self.tokens = float(self.burst)
        self.stamp = time.monotonic()
        self.lock = threading.Lock()  # shared by every connection in one direction

    def take(self, want: int) -> tuple[int, float]:
        """Grant up to `want` bytes now, or (0, seconds to wait before asking again)."""
        with self.lock:
            self._refill()
            need = min(want, self.quantum)
            if self.tokens < need:
                return 0, (need - self.tokens) / self.rate
            granted = min(want, int(self.tokens))
            self.tokens -= granted
            return granted, 0.0

    def give_back(self, unused: int) -> None:
        with self.lock:
            self.tokens = min(float(self.burst), self.tokens + unused)

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now


class _Trigger:
    """One armed `after_bytes` fault; fires once, on whichever connection gets there first."""

    def __init__(self, fault: str, count: int) -> None:
        self.fault = fault
        self.count = count


class _View(NamedTuple):
    """What a pump may do this turn, read under the proxy's lock."""

    fault: str | None
    stalled: bool


class _Pump:
    """Copies one direction of one connection: src -> dst."""

    def __init__(self, proxy: FaultProxy, link: _Link, direction: str) -> None:
        self.proxy = proxy
        self.link = link
        self.direction = direction
        self.src, self.dst = link.sockets if direction == "up" else link.sockets[::-1]
        self.waker = _Waker()
        self.buf = bytearray(CHUNK)
        self.view = memoryview(self.buf)
        self.readable = self._poller(self.src, select.POLLIN)
        self.writable = self._poller(self.dst, select.POLLOUT)
        self.sleeper = self._poller(None, 0)
        name = f"faultproxy-{proxy.port}-{link.number}-{direction}"
        self.thread = threading.Thread(target=self.run, name=name, daemon=True)

    def _poller(self, sock: socket.socket | None, events: int) -> select.poll:
        poller = select.poll()
        poller.register(self.waker, select.POLLIN)
        if sock is not None:
            poller.register(sock, events)
        return poller

    def run(self) -> None:
        try:
            self._forward()
        except _End:
            pass
        except BaseException:
            self.proxy._fail(self.link, "reset")  # a bug here must not hang both peers
            raise
        finally:
            self.proxy._finish(self)

    def _forward(self) -> None:
        pending = self.view[:0]
        while True:
            # Every turn starts from the current state, so a stalled pump stops reading.
            view = self.proxy._sync(self)
            if view.fault is not None:
                return
            if view.stalled:
                self._sleep(IDLE)
            elif not pending:
                pending = self._receive()
            else:
                pending = self._send(pending)

    def _receive(self) -> memoryview:
        try:
            n = self.src.recv_into(self.buf)
        except (BlockingIOError, InterruptedError):
            self._wait(self.readable)
            return self.view[:0]
        except OSError:
            self.proxy._fail(self.link, "reset")  # pass a reset on, as the network would
            raise _End from None
        if n == 0:
            self._pass_eof()
            raise _End
        return self.view[:n]

    def _send(self, pending: memoryview) -> memoryview:
        try:
            sent, delay = self.proxy._transmit(self, pending)
        except OSError:
            self.proxy._fail(self.link, "reset")
            raise _End from None
        if sent:
            return pending[sent:]
        if delay:
            self._sleep(delay)  # the rate limit
        else:
            self._wait(self.writable)
        return pending

    def _pass_eof(self) -> None:
        # The sender is done: pass its FIN on and keep the other direction open.
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _wait(self, poller: select.poll) -> None:
        for fd, _ in poller.poll(IDLE * 1000):
            if fd == self.waker.fileno():
                self.waker.drain()

    def _sleep(self, seconds: float) -> None:
        if self.sleeper.poll(max(1, int(seconds * 1000))):
            self.waker.drain()


class _Link:
    """One proxied connection: the client's socket, the target's, and a pump each way."""

    def __init__(self, number: int, client: socket.socket, target: socket.socket) -> None:
        self.number = number
        self.sockets = (client, target)
        self.fault: str | None = None  # "reset" or "cut" once this connection must end
        self.passed = dict.fromkeys(DIRECTIONS, 0)
        self.limits: dict[str, tuple[_Trigger, int]] = {}  # direction -> (trigger, at passed)
        self.pumps: dict[str, _Pump] = {}
        self.running = 0
        self.closed = False


class FaultProxy:
    """Proxies TCP connections on `.port` to (target_host, target_port), with faults.

    Use as a context manager, or call close(): it aborts whatever is still
    connected, closes every socket and joins every thread."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        listen_host: str = "127.0.0.1",
        *,
        listen_port: int = 0,
        connect_timeout: float = 5.0,
    ) -> None:
        self._target = socket.getaddrinfo(target_host, target_port, type=socket.SOCK_STREAM)[0]
        self._connect_timeout = connect_timeout
        self._cond = threading.Condition()  # guards every field below
        self._links: list[_Link] = []
        self._threads: list[threading.Thread] = []
        self._stalled = dict.fromkeys(DIRECTIONS, False)
        self._buckets: dict[str, _Bucket | None] = dict.fromkeys(DIRECTIONS)
        self._triggers: dict[str, _Trigger] = {}
        self._refusing = False
        self._closing = False
        self._forwarded = dict.fromkeys(DIRECTIONS, 0)
        self._counts = dict.fromkeys(("accepted", "connected", "refused", "connect_failures"), 0)
        self._listener = self._listen(listen_host, listen_port)
        self.host = listen_host
        self.port: int = self._listener.getsockname()[1]
        self._accept_waker = _Waker()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"faultproxy-{self.port}-accept", daemon=True
        )
        self._threads.append(self._accept_thread)
        self._accept_thread.start()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    # Faults.

    def reset(self) -> None:
        """Abort every current connection: both peers see ECONNRESET."""
        self._end_links("reset")

    def cut(self) -> None:
        """Shut down and close both sides of every current connection: both peers see EOF."""
        self._end_links("cut")

    def stall(self, direction: str = "both") -> None:
        """Stop forwarding in `direction` without closing anything, until resume()."""
        stalled = dict.fromkeys(_directions(direction), True)
        self._change(lambda: self._stalled.update(stalled))

    def resume(self, direction: str = "both") -> None:
        flowing = dict.fromkeys(_directions(direction), False)
        self._change(lambda: self._stalled.update(flowing))

    def slow(self, bytes_per_s: float | None, direction: str = "both") -> None:
        """Limit forwarding in each of `direction` to `bytes_per_s`; None removes the limit."""
        if bytes_per_s is not None and not bytes_per_s > 0:
            raise ValueError(f"a rate must be positive or None, not {bytes_per_s!r}")
        directions = _directions(direction)

        def limit() -> None:
            for d in directions:
                self._buckets[d] = None if bytes_per_s is None else _Bucket(bytes_per_s)

        self._change(limit)

    def after_bytes(self, n: int, fault: str, direction: str = "up") -> None:
        """Fire `fault` ("reset", "cut" or "stall") once exactly `n` more bytes have
        passed in `direction` on a current connection, or on a new one accepted
        while armed.  It fires once, as if reset()/cut()/stall(direction) were
        called right then: the connection that got there stops at exactly n."""
        if fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}, not {fault!r}")
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
        if n < 1:
            raise ValueError(f"n must be at least 1, not {n}")
        trigger = _Trigger(fault, n)

        def arm() -> None:
            self._triggers[direction] = trigger
            for link in self._links:
                link.limits[direction] = (trigger, link.passed[direction] + n)

        self._change(arm)

    def refuse_new(self, refuse: bool = True) -> None:
        """Reset new connections as soon as they are accepted (a host that is down)."""
        with self._cond:
            self._refusing = refuse

    def heal(self) -> None:
        """Clear every stall, rate limit, armed trigger and refusal."""

        def clear() -> None:
            self._stalled = dict.fromkeys(DIRECTIONS, False)
            self._buckets = dict.fromkeys(DIRECTIONS)
            self._triggers.clear()
            self._refusing = False
            for link in self._links:
                link.limits.clear()

        self._change(clear)

    # Counters.

    def forwarded(self, direction: str) -> int:
        """Bytes forwarded in `direction` over every connection so far."""
        with self._cond:
            return self._forwarded[_one_direction(direction)]

    @property
    def accepted(self) -> int:
        """Connections accepted, including refused ones and failed connects."""
        return self._count("accepted")

    @property
    def connected(self) -> int:
        """Connections proxied through to the target."""
        return self._count("connected")

    @property
    def refused(self) -> int:
        return self._count("refused")

    @property
    def connect_failures(self) -> int:
        return self._count("connect_failures")

    @property
    def active(self) -> int:
        """Connections open right now."""
        with self._cond:
            return len(self._links)

    def wait_for_bytes(self, n: int, direction: str = "up", timeout: float = 10.0) -> int:
        """Wait until at least `n` bytes were forwarded in `direction`; TimeoutError if not."""
        d = _one_direction(direction)
        self._await(lambda: self._forwarded[d] >= n, f"{n} bytes {d}", timeout)
        return self.forwarded(d)

    def wait_for_connections(self, n: int, timeout: float = 10.0) -> int:
        """Wait until `n` connections in all were proxied through to the target."""
        self._await(lambda: self._counts["connected"] >= n, f"{n} connections", timeout)
        return self.connected

    # Closing.

    def close(self) -> None:
        """Stop accepting, abort every connection and join every thread (idempotent)."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
        deadline = time.monotonic() + CLOSE_DEADLINE
        self._accept_waker.wake()
        self._accept_thread.join(_left(deadline))
        if self._accept_thread.is_alive():
            raise RuntimeError("fault proxy: the accept thread did not stop")
        self._listener.close()  # only now: the accept thread polled it
        self._accept_waker.close()
        try:
            self._end_links("reset")
        finally:
            self._join_all(deadline)

    def _join_all(self, deadline: float) -> None:
        with self._cond:
            threads = list(self._threads)
        for thread in threads:
            thread.join(_left(deadline))
        alive = [t.name for t in threads if t.is_alive()]
        if alive:
            raise RuntimeError(f"fault proxy: threads still running after close: {alive}")

    # Accepting.

    @staticmethod
    def _listen(host: str, port: int) -> socket.socket:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(family, kind, proto)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(addr)
            listener.listen(128)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        return listener

    def _accept_loop(self) -> None:
        poller = select.poll()
        poller.register(self._listener, select.POLLIN)
        poller.register(self._accept_waker, select.POLLIN)
        while not self._closing:
            poller.poll(IDLE * 1000)
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                # Out of fds or the like: drop nothing, try again a little later.
                time.sleep(IDLE)
                continue
            self._admit(client)

    def _admit(self, client: socket.socket) -> None:
        client.setblocking(False)
        with self._cond:
            self._counts["accepted"] += 1
            refusing = self._refusing
            self._threads = [t for t in self._threads if t.is_alive()]
        if refusing:
            self._bump("refused")
            _abort(client)
            return
        target = self._connect_target()
        if target is None:
            self._bump("connect_failures")
            _abort(client)  # as if the path to the target were broken
            return
        for sock in (client, target):
            # Small RPC messages must not wait on Nagle: the proxy adds no latency of its own.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = self._register(client, target)
        if link is not None:
            for pump in link.pumps.values():
                pump.thread.start()

    def _connect_target(self) -> socket.socket | None:
        """A connected, non-blocking socket to the target, or None.  Polls in short
        steps so close() need not wait out the connect timeout."""
        family, kind, proto, _, addr = self._target
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        err = sock.connect_ex(addr)
        if err in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EINTR):
            err = self._finish_connect(sock)
        if err:
            sock.close()
            return None
        return sock

    def _finish_connect(self, sock: socket.socket) -> int:
        poller = select.poll()
        poller.register(sock, select.POLLOUT)
        poller.register(self._accept_waker, select.POLLIN)
        deadline = time.monotonic() + self._connect_timeout
        while not self._closing and _left(deadline) > 0:
            # Any event on the socket (writable, error, hang-up) means the connect is over.
            if any(fd == sock.fileno() for fd, _ in poller.poll(min(IDLE, _left(deadline)) * 1000)):
                return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        return errno.ETIMEDOUT

    def _register(self, client: socket.socket, target: socket.socket) -> _Link | None:
        with self._cond:
            if self._closing:
                link = None
            else:
                self._counts["connected"] += 1
                link = _Link(self._counts["connected"], client, target)
                for d, trigger in self._triggers.items():
                    link.limits[d] = (trigger, trigger.count)
                for d in DIRECTIONS:
                    link.pumps[d] = _Pump(self, link, d)
                    self._threads.append(link.pumps[d].thread)
                link.running = len(link.pumps)
                self._links.append(link)
        if link is None:
            _abort(client)
            _abort(target)
        return link

    # State shared with the pumps; every method holds the lock only briefly.

    def _sync(self, pump: _Pump) -> _View:
        with self._cond:
            return _View(pump.link.fault, self._stalled[pump.direction])

    def _transmit(self, pump: _Pump, pending: memoryview) -> tuple[int, float]:
        """Send as much of `pending` as a stall, the rate limit and an armed trigger
        allow: (bytes sent, seconds to wait before trying again).  The send (never
        blocking) and its count happen under the lock, so that a change of state
        applies from the very next byte, whenever it comes."""
        link, d = pump.link, pump.direction
        with self._cond:
            if link.fault is not None or self._stalled[d]:
                return 0, IDLE  # woken early by resume() or the fault
            limit = link.limits.get(d)
            want = len(pending) if limit is None else min(len(pending), limit[1] - link.passed[d])
            bucket = self._buckets[d]
            granted, delay = (want, 0.0) if bucket is None else bucket.take(want)
            if granted <= 0:
                return 0, delay or IDLE
            try:
                sent = pump.dst.send(pending[:granted], NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                sent = 0
            if bucket is not None and sent < granted:
                bucket.give_back(granted - sent)
            if sent:
                self._account(link, d, sent)
            return sent, 0.0

    def _account(self, link: _Link, d: str, sent: int) -> None:
        link.passed[d] += sent
        self._forwarded[d] += sent
        limit = link.limits.get(d)
        if limit is not None and link.passed[d] >= limit[1]:
            self._fire(limit[0], d)
        self._cond.notify_all()

    def _fire(self, trigger: _Trigger, direction: str) -> None:
        """Called with the lock held, by the pump whose byte count reached the trigger."""
        if self._triggers.get(direction) is trigger:
            del self._triggers[direction]
        for link in self._links:
            if link.limits.get(direction, (None,))[0] is trigger:
                del link.limits[direction]
        if trigger.fault == "stall":
            self._stalled[direction] = True
        else:
            for link in self._links:
                _mark(link, trigger.fault)
        for link in self._links:
            for pump in link.pumps.values():
                pump.waker.wake()

    def _fail(self, link: _Link, fault: str) -> None:
        with self._cond:
            _mark(link, fault)
            pumps = list(link.pumps.values())
        for pump in pumps:
            pump.waker.wake()

    def _finish(self, pump: _Pump) -> None:
        link = pump.link
        with self._cond:
            link.running -= 1
            last = link.running == 0
            self._cond.notify_all()
        if not last:
            return
        _close_link(link)
        with self._cond:
            self._links.remove(link)
            link.closed = True
            self._cond.notify_all()

    def _change(self, apply: Callable[[], None]) -> None:
        """Apply a state change; wake every pump so that a stalled one stops reading."""
        with self._cond:
            apply()
            pumps = [p for link in self._links for p in link.pumps.values()]
        for pump in pumps:
            pump.waker.wake()

    def _end_links(self, fault: str) -> None:
        with self._cond:
            links = list(self._links)
            for link in links:
                _mark(link, fault)
        for link in links:
            for pump in link.pumps.values():
                pump.waker.wake()
        self._await(lambda: all(link.closed for link in links), f"{fault} of {len(links)}")

    def _await(self, done: Callable[[], bool], what: str, timeout: float = FAULT_DEADLINE):
        with self._cond:
            if not self._cond.wait_for(done, timeout):
                raise TimeoutError(f"fault proxy: {what} not done within {timeout} s")

    def _count(self, name: str) -> int:
        with self._cond:
            return self._counts[name]

    def _bump(self, name: str) -> None:
        with self._cond:
            self._counts[name] += 1
            self._cond.notify_all()


def _mark(link: _Link, fault: str) -> None:
    # A reset overrides a cut that has not happened yet; nothing overrides a reset.
    if link.fault is None or fault == "reset":
        link.fault = fault


def _close_link(link: _Link) -> None:
    """Close both sockets the way the link's fault asks: a reset or an orderly close."""
    for sock in link.sockets:
        if link.fault == "reset":
            _abort(sock)
        else:
            _close_in_order(sock)
    for pump in link.pumps.values():
        pump.waker.close()


def _abort(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends RST, so the peer sees ECONNRESET."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _close_in_order(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    # Closing with unread data makes the kernel send RST instead of FIN: read it first.
    try:
        for _ in range(256):
            if not sock.recv(CHUNK):
                break
    except OSError:
        pass
    sock.close()


def _directions(direction: str) -> tuple[str, ...]:
    """The directions `direction` ("up", "down" or "both") names."""
    if direction == "both":
        return DIRECTIONS
    return (_one_direction(direction),)


def _one_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    return direction


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())
