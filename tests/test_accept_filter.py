"""The accept filter (issue 19): connections that have not said enough wait
in the core, never reach the caller, and are dropped by reason.

Every test runs on both cores in one run (the ``core`` fixture, as in
test_core.py), through real loopback sockets.  No timing asserts: a
connection that must not come back is checked with short waits (it is not
returned, whatever the timing), one that must come back with bounded ones.
"""

import errno
import logging
import os
import signal
import socket
import ssl
import threading
import time

import pytest
from helpers import wait_for

import fastlisten
from fastlisten import ListenConfig, Listener, _corepy
from fastlisten.proxy import V1, V2

LOOPBACK = ("127.0.0.1", 0)
HEAD = b"GET /index.html HTTP/1.1\r\nHost: example\r\nAccept: */*\r\n\r\n"
PROXY_V1 = b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n"
LOCAL = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"     # v2 LOCAL, no addresses
LINGER_0 = b"\x01\x00\x00\x00\x00\x00\x00\x00"        # SO_LINGER on, 0 s: close() resets


def _core_params():
    if os.environ.get("FASTLISTEN_NO_EXTENSIONS") == "1":
        return ["pure"]
    return ["compiled", "pure"]


@pytest.fixture(autouse=True, params=_core_params())
def core(request, monkeypatch):
    """Every Listener made by a test runs on this core."""
    if request.param == "compiled":
        from fastlisten import _core as module
    else:
        module = _corepy
    monkeypatch.setattr(fastlisten.listener, "RawListener", module.RawListener)
    return module


@pytest.fixture
def make():
    """make(rule, **filter options) -> a listening Listener with that
    filter; make.client(...) -> a connected client socket.  All closed at
    the end."""
    made, clients = [], []

    def listener(rule, **options):
        lst = fastlisten.listen(LOOPBACK)
        made.append(lst)
        lst.set_accept_filter(rule, **options)
        return lst

    def client(lst, data=b""):
        c = socket.create_connection(lst.address, timeout=5)
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        clients.append(c)
        if data:
            c.sendall(data)
        return c

    listener.client = client
    yield listener
    for c in clients:
        c.close()
    for lst in made:
        lst.close()


def take(lst, timeout=5.0):
    """The next ready connection (bounded wait); fails the test if none."""
    conn, addr = lst.accept(timeout=timeout)
    return conn


def none_ready(lst, rounds=3, timeout=0.05):
    """accept_many returns nothing for a few short waits."""
    for _ in range(rounds):
        batch = lst.accept_many(timeout=timeout)
        if batch:
            for conn, _ in batch:
                conn.close()
            return False
    return True


def dropped(lst, reason):
    return lst.stats()["dropped"].get(reason, 0)


def wait_dropped(lst, reason, n=1, limit=10.0):
    """Run the filter (accept_many) until n connections were dropped for
    reason; none may be handed over meanwhile."""
    def done():
        batch = lst.accept_many(timeout=0.02)
        assert not batch, f"handed over: {batch}"
        return dropped(lst, reason) >= n
    wait_for(done, timeout=limit)


def closed_by_server(c):
    """The server closed the client's connection: EOF or a reset."""
    c.settimeout(5)
    try:
        return c.recv(100) == b""
    except ConnectionResetError:
        return True


def read_exactly(conn, n):
    conn.settimeout(5)
    out = b""
    while len(out) < n:
        chunk = conn.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


# -- the rules, through sockets -----------------------------------------------

READY_BY_RULE = [
    ("data", b"x"),
    ("line", b"hello\n"),
    ("line", b"hello\r\n"),
    ("http", HEAD),
    ("http", b"GET /\r\n"),           # HTTP/0.9: the request line is all
    ("http", b"GET / HTTP/1.0\n\n"),  # bare LFs, as http.server reads them
]


@pytest.mark.parametrize("rule, data", READY_BY_RULE)
def test_a_silent_client_waits_and_a_complete_one_comes_with_every_byte(make, rule, data):
    lst = make(rule)
    silent = make.client(lst)
    assert none_ready(lst)
    make.client(lst, data)
    conn = take(lst)
    with conn:
        assert read_exactly(conn, len(data)) == data     # peeked, never consumed
        assert conn.getblocking()
    assert none_ready(lst)              # the silent one still waits
    stats = lst.stats()
    assert stats["waiting"] == 1 and stats["made_ready"] == 1 and stats["accepted"] == 1
    silent.close()


@pytest.mark.parametrize("rule, data", [("line", b"a line\n"), ("http", HEAD)])
def test_a_head_dribbled_one_byte_at_a_time_is_handed_over_only_whole(make, rule, data):
    lst = make(rule)
    c = make.client(lst)
    for i in range(len(data) - 1):
        c.sendall(data[i:i + 1])
        assert not lst.accept_many(timeout=0.005)
    c.sendall(data[-1:])
    with take(lst) as conn:
        assert read_exactly(conn, len(data)) == data
    assert lst.stats()["waited"] == 1


def test_a_waiting_connection_with_unread_bytes_costs_no_cpu_while_it_waits(make):
    """The bytes stay in the kernel (MSG_PEEK), so the connection stays
    readable: the core must wait for the next segment, not poll it again
    and again (edge-triggered)."""
    lst = make("http", timeout=1000)
    make.client(lst, b"GET / HTTP/1.1\r\n")
    wait_for(lambda: not lst.accept_many(timeout=0.02) and lst.stats()["waiting"] == 1,
             timeout=10)
    wall, cpu = time.monotonic(), time.thread_time()
    assert lst.accept_many(timeout=0.3) == []
    wall, cpu = time.monotonic() - wall, time.thread_time() - cpu
    assert cpu / wall < 0.5             # it slept rather than spun


def test_a_head_split_over_many_writes_is_judged_as_a_whole(make):
    lst = make("http")
    c = make.client(lst)
    parts = [HEAD[i:i + 7] for i in range(0, len(HEAD), 7)]
    for part in parts[:-1]:
        c.sendall(part)
    assert none_ready(lst, rounds=1)
    c.sendall(parts[-1])
    with take(lst) as conn:
        assert read_exactly(conn, len(HEAD)) == HEAD


@pytest.mark.parametrize("rule", ["line", "http"])
def test_a_head_over_max_bytes_is_dropped_as_oversize(make, rule):
    lst = make(rule, max_bytes=64)
    c = make.client(lst, b"G" * 100)
    wait_dropped(lst, "oversize")
    assert closed_by_server(c)
    # exactly at the cap, complete: handed over
    make.client(lst, b"G" * 62 + b"\n\n" if rule == "line" else b"GET / HTTP/1.0\r\n" + b"\r\n")
    take(lst).close()


def test_a_peer_that_says_something_and_shuts_its_side_is_handed_over(make):
    lst = make("line")
    c = make.client(lst, b"no newline")
    c.shutdown(socket.SHUT_WR)
    with take(lst) as conn:
        assert read_exactly(conn, 100) == b"no newline"


def test_a_peer_that_closes_without_a_word_is_dropped_as_closed(make):
    lst = make("data")
    c = make.client(lst)
    assert none_ready(lst, rounds=1)
    c.close()
    wait_dropped(lst, "closed")
    assert lst.stats()["waiting"] == 0


def test_a_reset_before_ready_is_dropped_and_never_handed_over(make):
    lst = make("http")
    c = make.client(lst, b"GET / HT")
    assert none_ready(lst, rounds=1)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)
    c.close()                       # RST
    wait_for(lambda: not lst.accept_many(timeout=0.02)
             and dropped(lst, "reset") + dropped(lst, "closed") == 1, timeout=10)
    assert lst.stats()["made_ready"] == 0


# -- the PROXY header first -------------------------------------------------

def test_with_proxy_the_header_comes_first_and_the_rule_applies_after_it(make):
    lst = make("line", proxy=V1 | V2)
    c = make.client(lst, PROXY_V1)
    assert none_ready(lst)              # the header alone is not a line of the client's
    c.sendall(b"hi\n")
    with take(lst) as conn:
        assert read_exactly(conn, len(PROXY_V1) + 3) == PROXY_V1 + b"hi\n"
        assert fastlisten.proxy_parse(PROXY_V1).source == ("192.0.2.1", 56324)


def test_with_proxy_and_rule_none_the_complete_header_is_enough(make):
    lst = make("none", proxy=V1)
    c = make.client(lst, PROXY_V1[:10])
    assert none_ready(lst)
    c.sendall(PROXY_V1[10:])
    with take(lst) as conn:
        assert fastlisten.proxy_read(conn, V1).source == ("192.0.2.1", 56324)


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\n\r\n",                          # no header at all
    b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 99999\r\n",  # a bad port
    b"PROXY TCP9 x\r\n",
    b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c" + bytes(12),  # v2 version 3
])
def test_a_malformed_proxy_header_is_dropped(make, data):
    lst = make("data", proxy=V1 | V2)
    c = make.client(lst, data)
    wait_dropped(lst, "malformed")
    assert closed_by_server(c)


@pytest.mark.parametrize("rule", ["none", "data", "line", "http"])
def test_a_health_check_local_header_then_close_is_dropped_as_closed(make, rule):
    lst = make(rule, proxy=V2)
    c = make.client(lst, LOCAL)
    c.close()
    wait_dropped(lst, "closed")
    assert lst.stats()["made_ready"] == 0 and lst.stats()["waiting"] == 0


@pytest.mark.parametrize("rule", ["none", "data", "line", "http"])
def test_a_health_check_local_header_then_reset_is_dropped_as_reset(make, rule):
    """HAProxy's checks with send-proxy-v2: a LOCAL header, then a reset."""
    lst = make(rule, proxy=V1 | V2)
    c = make.client(lst, LOCAL)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)
    c.close()
    wait_dropped(lst, "reset")
    assert lst.stats()["made_ready"] == 0 and lst.stats()["waiting"] == 0
    assert "closed" not in lst.stats()["dropped"]


@pytest.mark.parametrize("rule, data", [("none", b"x"), ("data", b"x"), ("line", b"a line\n"),
                                        ("http", HEAD)])
def test_a_local_connection_that_sends_data_follows_the_rule(make, rule, data):
    lst = make(rule, proxy=V2)
    c = make.client(lst, LOCAL)
    assert none_ready(lst)
    c.sendall(data[:-1])
    if len(data) > 1:
        assert none_ready(lst, rounds=1)
    c.sendall(data[-1:])
    with take(lst) as conn:
        assert fastlisten.proxy_read(conn, V2).command == "LOCAL"
        assert read_exactly(conn, len(data)) == data


def test_a_proxy_command_header_alone_is_enough_for_rule_none(make):
    """Only LOCAL waits for more: a relayed connection's header is enough,
    as before (a server that speaks first)."""
    header = (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c"
              b"\xc0\x00\x02\x01\xc6\x33\x64\x07\xdb\xf4\x01\xbb")
    lst = make("none", proxy=V2)
    make.client(lst, header)
    with take(lst) as conn:
        assert fastlisten.proxy_read(conn, V2).source == ("192.0.2.1", 56308)


# -- TLS ----------------------------------------------------------------------

def client_hello():
    """The first flight of a real TLS client (the ssl module's, in memory)."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="example")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_tls_waits_for_the_whole_client_hello_record(make):
    hello = client_hello()
    assert hello[0] == 22 and len(hello) == 5 + int.from_bytes(hello[3:5], "big")
    lst = make("tls")
    c = make.client(lst, hello[:5])
    assert none_ready(lst)
    c.sendall(hello[5:-1])
    assert none_ready(lst, rounds=1)
    c.sendall(hello[-1:])
    with take(lst) as conn:
        assert read_exactly(conn, len(hello)) == hello


def test_tls_drops_what_is_not_a_client_hello(make):
    lst = make("tls")
    c = make.client(lst, HEAD)
    wait_dropped(lst, "malformed")
    assert closed_by_server(c)


# -- split, oversized and malformed heads, each rule, with and without PROXY --

def heads_by_rule():
    """(rule, a complete head of it) for every rule that waits."""
    return [("data", b"x"), ("line", b"a line of text\r\n"), ("http", HEAD),
            ("tls", client_hello())]


@pytest.mark.parametrize("prefix", [b"", PROXY_V1, LOCAL], ids=["bare", "proxy-v1", "local"])
@pytest.mark.parametrize("index", range(4), ids=["data", "line", "http", "tls"])
def test_a_head_split_over_many_writes_comes_whole_for_each_rule(make, index, prefix):
    """The PROXY header and the head cut into a few writes at odd places,
    each one judged: handed over once the last byte arrived, every byte
    there for the reader."""
    rule, head = heads_by_rule()[index]
    whole = prefix + head
    lst = make(rule, proxy=V1 | V2 if prefix else 0)
    c = make.client(lst)
    cuts = sorted({1, len(prefix) // 2, len(prefix) + 1, len(whole) // 2, len(whole) - 1}
                  - {0, len(whole)})
    at = 0
    for cut in cuts:
        c.sendall(whole[at:cut])
        at = cut
        assert none_ready(lst, rounds=1), whole[:cut]
    c.sendall(whole[at:])
    with take(lst) as conn:
        assert read_exactly(conn, len(whole)) == whole
    assert lst.stats()["dropped"] == {}


@pytest.mark.parametrize("prefix", [b"", PROXY_V1], ids=["bare", "proxy-v1"])
@pytest.mark.parametrize("rule", ["line", "http"])
def test_an_oversized_head_split_over_writes_is_dropped_after_a_proxy_header_too(
        make, rule, prefix):
    """max_bytes counts from the end of the PROXY header."""
    lst = make(rule, max_bytes=40, proxy=V1 if prefix else 0)
    c = make.client(lst, prefix + b"GET /" + b"a" * 20)
    assert none_ready(lst, rounds=1)
    c.sendall(b"a" * 20)                    # 45 bytes after the header, no line end
    wait_dropped(lst, "oversize")
    assert closed_by_server(c)
    # 40 bytes after the header, the line end included: within the cap
    head = (b"GET / HTTP/1.0\r\nX: " + b"a" * 17 + b"\r\n\r\n" if rule == "http"
            else b"b" * 38 + b"\r\n")
    assert len(head) == 40
    make.client(lst, prefix + head)
    with take(lst) as conn:
        assert read_exactly(conn, len(prefix + head)) == prefix + head


MALFORMED_PROXY = [
    b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 99999\r\n",     # a bad port
    b"\r\n\r\n\x00\r\nQUIT\n\x22\x00\x00\x00",                # v2 command 2
    b"GET / HTTP/1.1\r\n\r\n",                                # no header at all
]


@pytest.mark.parametrize("bad", range(len(MALFORMED_PROXY)), ids=["port", "command", "none"])
@pytest.mark.parametrize("rule", ["none", "data", "line", "http", "tls"])
def test_a_malformed_proxy_header_is_dropped_whatever_the_rule(make, rule, bad):
    lst = make(rule, proxy=V1 | V2)
    data = MALFORMED_PROXY[bad]
    if data.startswith((b"PROXY", b"\r\n")):
        c = make.client(lst, data[:7])      # a valid start, judged once
        assert none_ready(lst, rounds=1)
        c.sendall(data[7:])
    else:
        c = make.client(lst, data)
    wait_dropped(lst, "malformed")
    assert closed_by_server(c)
    assert lst.stats()["made_ready"] == 0


@pytest.mark.parametrize("data", [HEAD, b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",
                                  b"\x16\x03\x01\x40\x01", b"\x16\x02"],
                         ids=["http", "server-hello", "over-2^14", "version"])
def test_tls_drops_a_malformed_record_after_a_proxy_header_too(make, data):
    lst = make("tls", proxy=V1)
    c = make.client(lst, PROXY_V1 + data)
    wait_dropped(lst, "malformed")
    assert closed_by_server(c)


# -- deadlines, the cap, close --------------------------------------------------

def test_a_connection_past_its_deadline_is_closed_as_expired(make):
    lst = make("http", timeout=0.2)
    c = make.client(lst, b"GET / HTTP/1.1\r\n")
    wait_dropped(lst, "expired")
    assert closed_by_server(c)
    assert lst.stats()["waiting"] == 0


def test_a_client_below_the_minimum_rate_is_dropped_long_before_its_deadline(make, caplog):
    """A head dribbled at about ten bytes a second, against a minimum of a
    thousand: closed ('slow') at the first byte after its first second,
    whatever the machine's speed (a slower machine only dribbles slower)."""
    lst = make("http", timeout=1000, min_rate=1000)
    c = make.client(lst)
    head = HEAD * 10
    sent = 0

    def dribble():
        nonlocal sent
        try:
            c.sendall(head[sent:sent + 1])
            sent += 1
        except OSError:
            pass                        # closed by the server meanwhile
        assert not lst.accept_many(timeout=0.1)
        return dropped(lst, "slow") == 1
    with caplog.at_level(logging.WARNING, logger="fastlisten"):
        wait_for(dribble, timeout=30)
    assert closed_by_server(c)
    assert sent < len(HEAD)             # it never got near a whole head
    assert lst.stats()["dropped"] == {"slow": 1}
    warned = filter_warnings(caplog)
    assert len(warned) == 1 and "slow" in warned[0], warned


def test_the_first_second_is_free_of_the_minimum_rate(make):
    """A byte just after the accept is far below a thousand bytes a second
    of the few milliseconds waited, but the rate counts only from the
    first second on: judged then, nothing is dropped."""
    lst = make("line", timeout=1000, min_rate=1000)
    start = time.monotonic()
    c = make.client(lst)
    wait_for(lambda: not lst.accept_many(timeout=0.01) and lst.stats()["waiting"] == 1,
             timeout=10)
    c.sendall(b"a")
    assert none_ready(lst, rounds=1)
    if time.monotonic() - start >= 1.0:
        pytest.skip("the machine took a second to get here: the rate would apply")
    assert lst.stats()["dropped"] == {}
    c.sendall(b"\n")
    with take(lst) as conn:
        assert read_exactly(conn, 2) == b"a\n"


def test_a_client_above_the_minimum_rate_waits_for_its_head_as_usual(make):
    """200 bytes at once, then more after a second and more: far above one
    byte a second, so nothing is dropped, and the head comes whole."""
    lst = make("line", timeout=1000, min_rate=1)
    c = make.client(lst, b"a" * 200)
    start = time.monotonic()
    wait_for(lambda: not lst.accept_many(timeout=0.05)
             and time.monotonic() - start > 1.2, timeout=30)
    c.sendall(b"b")                     # judged again, past its first second
    assert none_ready(lst, rounds=2)
    c.sendall(b"\n")
    with take(lst) as conn:
        assert read_exactly(conn, 202) == b"a" * 200 + b"b\n"
    assert lst.stats()["dropped"] == {}


def test_an_empty_wait_ends_at_its_own_timeout_while_connections_wait(make):
    lst = make("data", timeout=1000)
    make.client(lst)
    assert lst.accept_many(timeout=0.05) == []        # returns, and nothing with it
    assert lst.stats()["waiting"] == 1


def test_at_the_cap_the_oldest_waiting_connection_makes_room(make):
    lst = make("data", max_waiting=3, timeout=1000)
    silent = []
    for _ in range(5):
        silent.append(make.client(lst))
        assert not lst.accept_many(timeout=0.02)
    wait_for(lambda: not lst.accept_many(timeout=0.02)
             and dropped(lst, "evicted") == 2, timeout=10)
    stats = lst.stats()
    assert stats["waiting"] == 3 and stats["waiting_peak"] == 3
    assert closed_by_server(silent[0]) and closed_by_server(silent[1])
    # a client that speaks still gets through, at once
    make.client(lst, b"x")
    take(lst).close()
    assert lst.stats()["waiting"] <= 3


def test_many_silent_clients_do_not_keep_a_ready_one_waiting(make):
    lst = make("line", max_waiting=10, timeout=1000)
    for _ in range(40):
        make.client(lst)
    make.client(lst, b"ready\n")
    with take(lst) as conn:
        assert read_exactly(conn, 6) == b"ready\n"
    assert lst.stats()["waiting"] <= 10


def test_close_closes_every_waiting_connection(make):
    lst = make("data", timeout=1000)
    clients = [make.client(lst) for _ in range(3)]
    wait_for(lambda: not lst.accept_many(timeout=0.02) and lst.stats()["waiting"] == 3,
             timeout=10)
    lst.close()
    assert dropped(lst, "shutdown") == 3 and lst.stats()["waiting"] == 0
    for c in clients:
        assert closed_by_server(c)


def test_close_waiting_closes_the_waiting_connections_and_keeps_listening(make):
    lst = make("line", timeout=1000)
    clients = [make.client(lst, b"no end of line yet") for _ in range(3)]
    wait_for(lambda: not lst.accept_many(timeout=0.02) and lst.stats()["waiting"] == 3,
             timeout=10)
    assert lst.close_waiting() == 3
    assert dropped(lst, "shutdown") == 3 and lst.stats()["waiting"] == 0
    for c in clients:
        assert closed_by_server(c)
    assert lst.close_waiting() == 0
    # the listener and its rule are as they were
    assert not lst.closed
    silent = make.client(lst)
    make.client(lst, b"hello\n")
    with take(lst) as conn:
        assert read_exactly(conn, 6) == b"hello\n"
    assert lst.stats()["waiting"] == 1
    lst.close()
    assert dropped(lst, "shutdown") == 4
    assert closed_by_server(silent)


def test_not_accepting_takes_only_what_waits_in_the_filter(make):
    """set_accepting(False): accept_many hands over the connections
    waiting in the filter as they become ready, and leaves new ones in the
    kernel's queue (for whoever else accepts on the socket); True again
    takes them."""
    lst = make("line", timeout=1000)
    waiting = make.client(lst, b"no end of line yet")
    wait_for(lambda: not lst.accept_many(timeout=0.02) and lst.stats()["waiting"] == 1,
             timeout=10)
    lst.set_accepting(False)
    make.client(lst, b"new\n")                  # ready at once, but new
    wait_for(lambda: lst.queue()[0] == 1, timeout=10)
    waiting.sendall(b"!\n")
    with take(lst) as conn:
        assert read_exactly(conn, 20) == b"no end of line yet!\n"
    assert lst.accept_many(timeout=0.05) == []   # the new one stays queued
    assert lst.queue()[0] == 1 and lst.stats()["waiting"] == 0
    lst.set_accepting(True)
    with take(lst) as conn:
        assert read_exactly(conn, 4) == b"new\n"


def test_close_waiting_while_another_thread_waits_in_accept_many(make):
    """The waiting thread keeps waiting through it, on the same filter,
    and takes the next ready connection."""
    lst = make("data", timeout=1000)
    clients = [make.client(lst) for _ in range(4)]
    got = []
    t = threading.Thread(target=lambda: got.append(lst.accept_many(timeout=30)))
    t.start()
    try:
        wait_for(lambda: lst.stats()["waiting"] == 4, timeout=10)
        assert lst.close_waiting() == 4
        for c in clients:
            assert closed_by_server(c)
        assert t.is_alive()             # nothing was handed to it
        make.client(lst, b"x")
        t.join(10)
    finally:
        lst.wakeup()
        t.join(10)
    assert not t.is_alive() and len(got) == 1 and len(got[0]) == 1
    conn, _ = got[0][0]
    with conn:
        assert read_exactly(conn, 1) == b"x"
    assert lst.stats()["dropped"] == {"shutdown": 4}


def test_close_waiting_without_a_filter_or_once_closed_is_zero():
    lst = fastlisten.listen(LOOPBACK)
    assert lst.close_waiting() == 0
    lst.set_accept_filter("data")
    lst.close()
    assert lst.close_waiting() == 0


def test_the_filter_cannot_change_while_connections_wait(make):
    lst = make("data", timeout=1000)
    make.client(lst)
    wait_for(lambda: not lst.accept_many(timeout=0.02) and lst.stats()["waiting"] == 1,
             timeout=10)
    with pytest.raises(OSError) as info:
        lst.set_accept_filter("line")
    assert info.value.errno == errno.EBUSY


def test_rule_none_takes_every_connection_at_once(make):
    lst = make("data", timeout=1000)
    lst.set_accept_filter("none")
    make.client(lst)
    take(lst).close()
    assert lst.stats()["waited"] == 0


# -- the wait stays what it was ---------------------------------------------------

def test_wakeup_ends_a_wait_at_once_while_connections_wait(make):
    lst = make("data", timeout=1000)
    make.client(lst)
    got = []
    t = threading.Thread(target=lambda: got.append(lst.accept_many(timeout=30)))
    t.start()
    wait_for(lambda: lst.stats()["waiting"] == 1, timeout=10)
    lst.wakeup()
    t.join(10)
    assert not t.is_alive() and got == [[]]


def test_a_signal_handler_that_raises_ends_the_wait(make):
    lst = make("data", timeout=1000)
    make.client(lst)

    def handler(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        with pytest.raises(KeyboardInterrupt):
            lst.accept_many(timeout=20)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_a_waiter_made_before_the_filter_is_refused(make):
    lst = fastlisten.listen(LOOPBACK)
    w = lst.waiter()
    try:
        lst.set_accept_filter("data")
        with pytest.raises(ValueError, match="before set_accept_filter"):
            lst.accept_many(1, 0.01, w)
    finally:
        w.close()
        lst.close()


def test_leader_follower_waiters_take_only_ready_connections_and_stop_at_once(make):
    """Three threads wait with waiters of one Stop, as ThreadingMixIn's
    leader/follower workers do: silent clients reach none of them, every
    ready one reaches exactly one, and set() ends every wait."""
    lst = make("line", timeout=1000)
    stop = lst.new_stop()
    got, lock = [], threading.Lock()

    def worker():
        w = lst.waiter(stop)
        try:
            while not stop.fenced:
                for conn, _ in lst.accept_many(1, None, w):
                    with conn:
                        data = read_exactly(conn, 6)
                    with lock:
                        got.append(data)
        finally:
            w.close()

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(5):
            make.client(lst)                    # silent
        wait_for(lambda: lst.stats()["waiting"] == 5, timeout=10)
        for i in range(10):
            make.client(lst, b"line%d\n" % i)
        wait_for(lambda: len(got) == 10, timeout=10)
        assert sorted(got) == sorted(b"line%d\n" % i for i in range(10))
        assert lst.stats()["waiting"] == 5
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        stop.close()
    assert not any(t.is_alive() for t in threads)


def test_the_counters_without_a_filter_are_zero():
    with fastlisten.listen(LOOPBACK) as lst:
        stats = lst.stats()
    assert (stats["waiting"], stats["waiting_peak"], stats["waited"], stats["made_ready"],
            stats["dropped"]) == (0, 0, 0, 0, {})


# -- configuration ------------------------------------------------------------------

def test_a_listener_from_config_applies_the_filter():
    cfg = ListenConfig(port=0, ready_rule="http", ready_timeout=5, max_waiting=4)
    with Listener.from_config(cfg) as lst:
        c = socket.create_connection(lst.address, timeout=5)
        with c:
            assert none_ready(lst, rounds=1)
            c.sendall(HEAD)
            with lst.accept(timeout=5)[0] as conn:
                assert read_exactly(conn, len(HEAD)) == HEAD


def test_a_listener_from_config_applies_the_minimum_rate():
    cfg = ListenConfig(port=0, ready_rule="http", ready_min_rate=1000, ready_timeout=1000)
    assert cfg.ready().min_rate == 1000
    with Listener.from_config(cfg) as lst:
        c = socket.create_connection(lst.address, timeout=5)
        with c:
            def dribble():              # a byte a round: far below 1000 a second
                try:
                    c.sendall(b"G")
                except OSError:
                    pass                # closed by the server meanwhile
                assert not lst.accept_many(timeout=0.1)
                return dropped(lst, "slow") == 1
            wait_for(dribble, timeout=30)
    assert ListenConfig(port=0, ready_rule="http").ready().min_rate == 0


def test_a_listener_takes_proxy_protocol_only_with_a_ready_rule():
    with pytest.raises(ValueError, match="ready_rule"):
        Listener.from_config(ListenConfig(port=0, proxy_protocol="v1"))
    cfg = ListenConfig(port=0, proxy_protocol="v1", ready_rule="none")
    with Listener.from_config(cfg) as lst:
        c = socket.create_connection(lst.address, timeout=5)
        with c:
            c.sendall(b"GET / HTTP/1.0\r\n\r\n")
            wait_dropped(lst, "malformed")


def test_the_default_cap_is_a_share_of_the_descriptor_headroom(monkeypatch):
    from fastlisten import listener as listener_module
    from fastlisten import sysinfo

    monkeypatch.setattr(sysinfo, "descriptor_headroom", lambda: 1000)
    assert listener_module.default_max_waiting() == 500
    monkeypatch.setattr(sysinfo, "descriptor_headroom", lambda: 1)
    assert listener_module.default_max_waiting() == 1
    monkeypatch.setattr(sysinfo, "descriptor_headroom", lambda: None)
    assert listener_module.default_max_waiting() == listener_module.UNLIMITED_MAX_WAITING


@pytest.mark.parametrize("options, exc", [
    (dict(rule="HTTP"), ValueError),
    (dict(rule="data", timeout=0), ValueError),
    (dict(rule="data", timeout="1"), TypeError),
    (dict(rule="data", max_bytes=0), ValueError),
    (dict(rule="data", max_waiting=0), ValueError),
    (dict(rule="data", proxy=4), ValueError),
    (dict(rule="data", proxy=V2, proxy_max_v2=10), ValueError),
    (dict(rule="data", min_rate=-1), ValueError),
    (dict(rule="data", min_rate=1.5), TypeError),
    (dict(rule="data", min_rate=True), TypeError),
])
def test_bad_filter_arguments_raise_on_both_cores(core, options, exc):
    raw = core.RawListener(socket.AF_INET)
    try:
        with pytest.raises(exc):
            raw.set_accept_filter(**options)
    finally:
        raw.close()


def test_a_unix_stream_listener_filters_too(tmp_path):
    path = str(tmp_path / "s.sock")
    with fastlisten.listen(path) as lst:
        lst.set_accept_filter("line", timeout=0.5)
        silent = socket.socket(socket.AF_UNIX)
        speaking = socket.socket(socket.AF_UNIX)
        with silent, speaking:
            silent.connect(path)
            speaking.connect(path)
            assert none_ready(lst, rounds=1)
            speaking.sendall(b"line\n")
            with lst.accept(timeout=5)[0] as conn:
                assert read_exactly(conn, 5) == b"line\n"
            wait_dropped(lst, "expired")
            assert closed_by_server(silent)


def test_a_default_socket_timeout_neither_stalls_the_filter_nor_is_lost(make):
    """socket.setdefaulttimeout applies to accepted connections (as the
    stdlib's accept does); judging a silent one must not wait that long
    (30 s here: the whole exchange gets 10)."""
    lst = make("line", timeout=1000)
    got = []

    def exchange():
        make.client(lst)                        # silent
        assert none_ready(lst, rounds=1)
        make.client(lst, b"ready\n")
        got.append(lst.accept(timeout=5)[0])

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        t = threading.Thread(target=exchange)
        t.start()
        t.join(10)
        stalled = t.is_alive()
        t.join()
    finally:
        socket.setdefaulttimeout(previous)
    assert not stalled, "judging a silent connection waited for its timeout"
    with got[0] as conn:
        assert conn.gettimeout() == 30
        assert read_exactly(conn, 6) == b"ready\n"


# -- drops logged once per run ------------------------------------------------

def filter_warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == "fastlisten" and r.levelno >= logging.WARNING
            and "accept filter" in r.getMessage()]


def test_a_run_of_drops_is_logged_once_with_its_reason_and_its_size_when_it_ends(
        make, caplog):
    lst = make("data", timeout=0.05)
    with caplog.at_level(logging.DEBUG, logger="fastlisten"):
        for _ in range(3):
            make.client(lst)                    # silent: they expire
        wait_dropped(lst, "expired", 3)
        warned = filter_warnings(caplog)
        assert len(warned) == 1, warned
        assert "expired" in warned[0] and "until a connection is made ready" in warned[0]
        make.client(lst, b"x")
        take(lst).close()
        warned = filter_warnings(caplog)
        assert len(warned) == 2, warned
        assert "3 connections were dropped in a row" in warned[1]
        # the next run is logged again (once the interval since the last
        # warning has passed: none here)
        lst.drop_log_interval = 0.0
        make.client(lst)
        wait_dropped(lst, "expired", 4)
        warned = filter_warnings(caplog)
        assert len(warned) == 3 and "expired" in warned[2], warned


def test_a_malformed_head_begins_a_run_logged_with_its_reason(make, caplog):
    lst = make("tls")
    with caplog.at_level(logging.WARNING, logger="fastlisten"):
        for _ in range(2):
            make.client(lst, b"GET / HTTP/1.1\r\n\r\n")
        wait_dropped(lst, "malformed", 2)
    warned = filter_warnings(caplog)
    assert len(warned) == 1 and "malformed" in warned[0], warned


def test_health_checks_and_scanners_are_counted_not_logged(make, caplog):
    lst = make("none", proxy=V2)
    with caplog.at_level(logging.DEBUG, logger="fastlisten"):
        make.client(lst, LOCAL).close()
        wait_dropped(lst, "closed")
        c = make.client(lst, LOCAL)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)
        c.close()
        wait_dropped(lst, "reset")
        lst.close_waiting()
    assert filter_warnings(caplog) == []
    assert lst.stats()["dropped"] == {"closed": 1, "reset": 1}


def test_runs_closer_together_than_the_interval_are_counted_and_named_in_the_next_warning(
        make, caplog):
    lst = make("data", timeout=0.05)
    with caplog.at_level(logging.WARNING, logger="fastlisten"):
        for run in range(3):
            make.client(lst)
            wait_dropped(lst, "expired", run + 1)
            make.client(lst, b"x")
            take(lst).close()               # ends the run
        assert len(filter_warnings(caplog)) == 1    # within drop_log_interval (60 s)
        lst.drop_log_interval = 0.0
        make.client(lst)
        wait_dropped(lst, "expired", 4)
    warned = filter_warnings(caplog)
    assert len(warned) == 2, warned
    assert "2 more runs of drops since the last warning" in warned[1]


def test_a_leader_follower_accept_function_logs_drops_itself(make, caplog):
    """accept_one_with()'s function (ThreadingMixIn's workers call only it
    while connections keep coming) checks the filter's drops."""
    lst = make("data", timeout=0.05)
    w = lst.waiter()
    try:
        accept = lst.accept_one_with(w, 0.02)
        with caplog.at_level(logging.WARNING, logger="fastlisten"):
            make.client(lst)

            def expired():
                assert accept() == []
                return dropped(lst, "expired") == 1
            wait_for(expired, timeout=10)
        assert len(filter_warnings(caplog)) == 1
    finally:
        w.close()


# -- descriptors alive elsewhere (a forked process's copies) --------------------

def _socket_inode(fd):
    """The inode of the socket behind descriptor fd of this process."""
    link = os.readlink(f"/proc/self/fd/{fd}")
    assert link.startswith("socket:["), link
    return int(link[len("socket:["):-1])


def _server_side_fd(client):
    """This process's descriptor of the server side of client's connection
    (the one waiting in the filter): the socket whose peer is client."""
    want = client.getsockname()
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:["):
                continue
            peer = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue        # (the listing's own descriptor, gone)
        try:
            if peer.type == socket.SOCK_STREAM and peer.getpeername() == want:
                return fd
        except OSError:
            pass
        finally:
            peer.close()
    raise AssertionError(f"no descriptor here is the server side of {want}")


def test_a_dropped_connection_leaves_the_epoll_set_though_a_copy_lives_on(make, core):
    # A copy of a waiting connection's descriptor (what a process forked
    # meanwhile holds; here a dup, in this process) keeps its file open
    # after the filter drops it.  Closed without EPOLL_CTL_DEL, it would
    # stay in the epoll set, and its peer's FIN would come under its old
    # slot (its old descriptor number, in the pure core), which the next
    # waiting connection holds by then: that connection would be judged
    # "closed" and dropped without having said a word.
    lst = make("line", timeout=1.0)
    a = make.client(lst)
    wait_for(lambda: not lst.accept_many(timeout=0.02) and lst.stats()["waiting"] == 1)
    fd_a = _server_side_fd(a)
    copy = os.dup(fd_a)
    b = socket.socket()     # now: the accept is to get the number a's leaves
    try:
        wait_dropped(lst, "expired")
        b.settimeout(5)
        b.connect(lst.address)
        wait_for(lambda: not lst.accept_many(timeout=0.02) and lst.stats()["waiting"] == 1)
        if core is _corepy:
            # the twin keys its epoll set by descriptor number: b has a's
            assert _server_side_fd(b) == fd_a
        a.close()                           # a FIN to the copy's file
        assert none_ready(lst)
        assert lst.stats()["waiting"] == 1 and "closed" not in lst.stats()["dropped"]
        b.sendall(b"spoke\n")
        conn = take(lst)
        try:
            assert read_exactly(conn, 6) == b"spoke\n"
        finally:
            conn.close()
    finally:
        b.close()
        os.close(copy)


def test_forget_filter_after_fork_closes_the_waiting_and_keeps_the_filter(make):
    # What the child side of a fork does (the os.register_at_fork hook),
    # called here in the only process that holds the descriptors: they are
    # closed (the peer sees EOF), not counted as drops (the parent's), and
    # the filter works on, with an epoll set of its own.
    lst = make("line", timeout=60)
    a = make.client(lst)
    wait_for(lambda: not lst.accept_many(timeout=0.02) and lst.stats()["waiting"] == 1)
    assert lst._raw.forget_filter_after_fork() == 1
    assert closed_by_server(a)
    assert lst.stats()["waiting"] == 0 and lst.stats()["dropped"] == {}
    b = make.client(lst)
    wait_for(lambda: not lst.accept_many(timeout=0.02) and lst.stats()["waiting"] == 1)
    b.sendall(b"after\n")
    conn = take(lst)
    try:
        assert read_exactly(conn, 6) == b"after\n"
    finally:
        conn.close()
    assert lst._raw.forget_filter_after_fork() == 0
