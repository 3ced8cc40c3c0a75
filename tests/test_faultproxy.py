"""The fault-injecting proxy: clean pass-through, each fault in each direction, and
that it survives faults, accepts new connections and leaves nothing behind."""

from __future__ import annotations

import os
import select
import socket
import threading
import time

import pytest

from toolstack.harness import FaultProxy

TIMEOUT = 5.0  # every blocking socket call in these tests ends within this
QUIET = 0.3  # how long "nothing arrives" is watched for


class Server:
    """A loopback TCP server, one thread per connection, that keeps what it receives
    and echoes it back (or only keeps it), and records how each connection ended."""

    def __init__(self, echo: bool = True) -> None:
        self.echo = echo
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)  # so the accept loop sees `stopping`
        self.port = self.listener.getsockname()[1]
        self.cond = threading.Condition()
        self.received: list[bytearray] = []  # per connection, in accept order
        self.endings: list[str] = []  # "eof" or "reset", as connections end
        self.stopping = False
        self.threads = [threading.Thread(target=self._accept_loop, name="test-server")]
        self.threads[0].start()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self.stopping = True
        self.threads[0].join(TIMEOUT)
        for thread in self.threads[1:]:
            thread.join(TIMEOUT)
        self.listener.close()
        assert not [t for t in self.threads if t.is_alive()], "server threads did not stop"

    def total(self) -> int:
        with self.cond:
            return sum(len(r) for r in self.received)

    def wait_received(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: sum(len(r) for r in self.received) >= n, TIMEOUT), (
                f"the server got {self.total()} of {n} bytes"
            )

    def wait_endings(self, n: int) -> list[str]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.endings) >= n, TIMEOUT), self.endings
            return list(self.endings)

    def _accept_loop(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with self.cond:
                self.received.append(bytearray())
                index = len(self.received) - 1
            thread = threading.Thread(target=self._serve, args=(conn, index), name="test-conn")
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket, index: int) -> None:
        conn.settimeout(0.05)
        with conn:
            ending = self._copy(conn, index)
            if ending == "eof":
                self._shutdown(conn)
        with self.cond:
            self.endings.append(ending)
            self.cond.notify_all()

    def _copy(self, conn: socket.socket, index: int) -> str:
        while not self.stopping:
            try:
                data = conn.recv(65536)
                if not data:
                    return "eof"
                with self.cond:
                    self.received[index] += data
                    self.cond.notify_all()
                if self.echo:
                    self._send_all(conn, data)
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                return "reset"
        return "stopped"

    @staticmethod
    def _shutdown(conn: socket.socket) -> None:
        # Echo the EOF; the peer may have reset in the meantime.
        try:
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _send_all(self, conn: socket.socket, data: bytes) -> None:
        # send() that times out has sent nothing, so it can be retried; sendall() can't.
        view = memoryview(data)
        while view and not self.stopping:
            try:
                view = view[conn.send(view) :]
            except TimeoutError:
                continue


class Sender:
    """sendall() in a thread, so that a test can read the echo meanwhile."""

    def __init__(self, sock: socket.socket, data: bytes) -> None:
        self.error: OSError | None = None
        self.thread = threading.Thread(target=self._send, args=(sock, data), name="test-sender")
        self.thread.start()

    def _send(self, sock: socket.socket, data: bytes) -> None:
        try:
            sock.sendall(data)
        except OSError as exc:
            self.error = exc

    def join(self) -> OSError | None:
        self.thread.join(TIMEOUT * 2)
        assert not self.thread.is_alive(), "the sender is stuck"
        return self.error


class Clients:
    """Client sockets and senders that a test starts; all ended at teardown."""

    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []
        self.senders: list[Sender] = []

    def connect(self, port: int) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.sockets.append(sock)
        return sock

    def send_in_background(self, sock: socket.socket, data: bytes) -> Sender:
        sender = Sender(sock, data)
        self.senders.append(sender)
        return sender

    def close(self) -> None:
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a sender blocked on it
            except OSError:
                pass
        for sender in self.senders:
            sender.join()
        for sock in self.sockets:
            sock.close()


def open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the directory listing's own fd, closed by now
    return fds


@pytest.fixture(autouse=True)
def nothing_left_behind():
    threads, fds = set(threading.enumerate()), open_fds()
    yield
    leaked = [t.name for t in threading.enumerate() if t not in threads]
    assert not leaked, f"threads left running: {leaked}"
    extra = {fd: what for fd, what in open_fds().items() if fds.get(fd) != what}
    assert not extra, f"file descriptors left open: {extra}"


@pytest.fixture
def server():
    with Server() as s:
        yield s


@pytest.fixture
def proxy(server):
    with FaultProxy("127.0.0.1", server.port) as p:
        yield p


@pytest.fixture
def clients():
    c = Clients()
    yield c
    c.close()


def recv_exactly(sock: socket.socket, n: int, timeout: float = 2 * TIMEOUT) -> bytes:
    """`n` bytes, or fewer if the stream ends first; TimeoutError after `timeout` in
    all (a trickle would reset a per-call timeout forever)."""
    deadline = time.monotonic() + timeout
    chunks, got = [], 0
    try:
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"got {got} of {n} bytes in {timeout} s")
            sock.settimeout(left)
            chunk = sock.recv(min(n - got, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    finally:
        sock.settimeout(TIMEOUT)
    return b"".join(chunks)


def assert_reset_when_connecting(clients: Clients, port: int) -> None:
    # The reset can come before the client's connect() has returned: either call raises.
    with pytest.raises(ConnectionResetError):
        clients.connect(port).recv(1)


def round_trip(sock: socket.socket, payload: bytes = b"ping") -> None:
    sock.sendall(payload)
    assert recv_exactly(sock, len(payload)) == payload


def assert_nothing_arrives(sock: socket.socket) -> None:
    sock.settimeout(QUIET)
    with pytest.raises(TimeoutError):
        sock.recv(1)
    sock.settimeout(TIMEOUT)


def fill_until_blocked(sock: socket.socket, data: bytes) -> int:
    """Send `data` until the socket stays unwritable for QUIET; how much was sent."""
    sock.setblocking(False)
    sent = 0
    while sent < len(data):
        if not select.select([], [sock], [], QUIET)[1]:
            break
        try:
            sent += sock.send(data[sent : sent + 65536])
        except BlockingIOError:
            pass
    sock.settimeout(TIMEOUT)
    return sent


def test_passes_8_mib_both_ways_intact(server, proxy, clients):
    client = clients.connect(proxy.port)
    data = os.urandom(8 << 20)
    sender = clients.send_in_background(client, data)
    echoed = recv_exactly(client, len(data))
    assert sender.join() is None
    assert echoed == data
    client.shutdown(socket.SHUT_WR)
    assert client.recv(1) == b""  # the server's EOF came back through too
    assert server.received == [bytearray(data)]
    assert proxy.forwarded("up") == proxy.forwarded("down") == len(data)
    assert (proxy.accepted, proxy.connected) == (1, 1)


def test_reset_reaches_both_peers_as_connection_reset(server, proxy, clients):
    client = clients.connect(proxy.port)
    round_trip(client)
    proxy.reset()
    with pytest.raises(ConnectionResetError):
        client.recv(1)
    assert server.wait_endings(1) == ["reset"]
    assert proxy.active == 0


def test_cut_reaches_both_peers_as_eof(server, proxy, clients):
    client = clients.connect(proxy.port)
    round_trip(client)
    proxy.cut()
    assert client.recv(1) == b""
    assert server.wait_endings(1) == ["eof"]
    assert proxy.active == 0


def test_stall_up_fills_the_senders_buffer_and_resume_loses_nothing(server, proxy, clients):
    client = clients.connect(proxy.port)
    round_trip(client)
    proxy.stall("up")
    data = os.urandom(32 << 20)
    sent = fill_until_blocked(client, data)
    assert 0 < sent < len(data), "the client's send never filled up"
    assert_nothing_arrives(client)
    assert (proxy.forwarded("up"), server.total()) == (4, 4)
    proxy.resume()
    assert recv_exactly(client, sent) == data[:sent]
    assert server.total() == 4 + sent


def test_stall_down_only_still_delivers_up(server, proxy, clients):
    client = clients.connect(proxy.port)
    round_trip(client)
    proxy.stall("down")
    payload = os.urandom(100_000)
    client.sendall(payload)
    server.wait_received(4 + len(payload))
    assert_nothing_arrives(client)
    assert proxy.forwarded("down") == 4
    proxy.resume("down")
    assert recv_exactly(client, len(payload)) == payload


def test_stall_mid_stream_stops_at_the_very_next_byte(clients):
    with Server(echo=False) as sink, FaultProxy("127.0.0.1", sink.port) as proxy:
        client = clients.connect(proxy.port)
        data = os.urandom(64 << 20)
        sender = clients.send_in_background(client, data)
        proxy.wait_for_bytes(1 << 20, "up")
        proxy.stall("up")
        stalled_at = proxy.forwarded("up")
        assert stalled_at < len(data)
        sink.wait_received(stalled_at)
        time.sleep(QUIET)
        assert (proxy.forwarded("up"), sink.total()) == (stalled_at, stalled_at)
        proxy.resume()
        assert sender.join() is None
        client.shutdown(socket.SHUT_WR)
        assert sink.wait_endings(1) == ["eof"]
        assert sink.received == [bytearray(data)]


@pytest.mark.parametrize("direction", ["up", "down"])
def test_slow_limits_the_rate(server, proxy, clients, direction):
    client = clients.connect(proxy.port)
    round_trip(client)
    proxy.slow(1_000_000, direction)
    data = os.urandom(2_000_000)
    start = time.monotonic()
    sender = clients.send_in_background(client, data)
    assert recv_exactly(client, len(data)) == data
    elapsed = time.monotonic() - start
    assert sender.join() is None
    # A lower bound only: an upper one would fail on a busy machine.
    assert elapsed >= 1.5, f"2 MB at 1 MB/s took only {elapsed:.2f} s"


def test_after_bytes_cut_stops_at_the_exact_count(clients):
    with Server(echo=False) as sink, FaultProxy("127.0.0.1", sink.port) as proxy:
        client = clients.connect(proxy.port)
        client.sendall(b"hello")
        sink.wait_received(5)
        proxy.after_bytes(100_000, "cut", "up")  # counted from now
        data = os.urandom(1 << 20)
        sender = clients.send_in_background(client, data)
        assert client.recv(1) == b""
        assert sink.wait_endings(1) == ["eof"]
        assert sink.received == [bytearray(b"hello" + data[:100_000])]
        assert proxy.forwarded("up") == 100_005
        sender.join()  # it may or may not have seen the cut, depending on buffering


def test_after_bytes_stall_holds_the_rest_until_resume(server, proxy, clients):
    client = clients.connect(proxy.port)
    round_trip(client)
    proxy.after_bytes(50_000, "stall", "down")
    payload = os.urandom(200_000)
    client.sendall(payload)
    server.wait_received(4 + len(payload))  # up is not stalled
    assert recv_exactly(client, 50_000) == payload[:50_000]
    assert_nothing_arrives(client)
    assert proxy.forwarded("down") == 4 + 50_000
    proxy.resume()
    assert recv_exactly(client, 150_000) == payload[50_000:]


def test_refuse_new_resets_new_connections_only(server, proxy, clients):
    existing = clients.connect(proxy.port)
    round_trip(existing)
    proxy.refuse_new(True)
    assert_reset_when_connecting(clients, proxy.port)
    round_trip(existing)
    assert (proxy.refused, len(server.received)) == (1, 1)
    proxy.refuse_new(False)
    round_trip(clients.connect(proxy.port))
    assert (proxy.accepted, proxy.connected, len(server.received)) == (3, 2, 2)


def test_heal_clears_every_fault_for_the_next_connection(server, proxy, clients):
    first = clients.connect(proxy.port)
    round_trip(first)
    proxy.stall()
    proxy.slow(1000)
    proxy.after_bytes(10, "reset")
    proxy.refuse_new(True)
    proxy.cut()
    assert first.recv(1) == b""
    proxy.heal()
    fresh = clients.connect(proxy.port)
    data = os.urandom(1 << 20)  # at 1000 bytes/s this would take far past TIMEOUT
    sender = clients.send_in_background(fresh, data)
    assert recv_exactly(fresh, len(data)) == data
    assert sender.join() is None
    assert (proxy.refused, proxy.active) == (0, 1)


def test_survives_two_cuts_and_proxies_new_connections(server, proxy, clients):
    for _ in range(2):
        client = clients.connect(proxy.port)
        round_trip(client)
        proxy.cut()
        assert client.recv(1) == b""
    round_trip(clients.connect(proxy.port), os.urandom(100_000))
    assert server.wait_endings(2) == ["eof", "eof"]
    assert proxy.connected == 3


def test_unreachable_target_resets_the_client(clients):
    with socket.create_server(("127.0.0.1", 0)) as gone:
        port = gone.getsockname()[1]
    with FaultProxy("127.0.0.1", port, connect_timeout=2.0) as proxy:
        assert_reset_when_connecting(clients, proxy.port)
        assert (proxy.accepted, proxy.connect_failures, proxy.connected) == (1, 1, 0)


def test_close_leaves_no_thread_or_socket_and_the_port_refuses(server, clients):
    threads, fds = set(threading.enumerate()), open_fds()
    proxy = FaultProxy("127.0.0.1", server.port)
    idle, stalled = clients.connect(proxy.port), clients.connect(proxy.port)
    round_trip(idle)
    round_trip(stalled)
    proxy.stall()
    stalled.sendall(os.urandom(100_000))
    proxy.close()
    # The server's threads may still be ending; the autouse fixture waits for those.
    assert [t.name for t in threading.enumerate() if t not in threads and "proxy" in t.name] == []
    for client in (idle, stalled):
        with pytest.raises(ConnectionResetError):
            client.recv(1)
    server.wait_endings(2)  # the server has closed its side of both connections
    assert set(open_fds()) == set(fds) | {idle.fileno(), stalled.fileno()}
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT).close()
    proxy.close()  # a second close is harmless


def test_rejects_unknown_directions_faults_and_rates(proxy):
    with pytest.raises(ValueError):
        proxy.stall("sideways")
    with pytest.raises(ValueError):
        proxy.after_bytes(10, "explode")
    with pytest.raises(ValueError):
        proxy.after_bytes(10, "cut", "both")
    with pytest.raises(ValueError):
        proxy.slow(0)
