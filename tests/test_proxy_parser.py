"""The PROXY protocol parser and reader: the compiled core (csrc/fl_proxy.c)
and its pure-Python twin run the same corpus in the same run and must give
the same results: the spec's examples, hand-made bad headers, and a
hypothesis-generated malformed corpus; then reading from real sockets.
"""

import os
import socket
import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastlisten import _corepy
from fastlisten import proxy as pp
from fastlisten.proxy import ProxyHeader, ProxyProtocolError

try:
    from fastlisten import _core
except ImportError:     # no compiler where this was installed
    _core = None

CORES = [pytest.param(_corepy, id="python"),
         pytest.param(_core, id="compiled",
                      marks=pytest.mark.skipif(_core is None, reason="fastlisten._core not built"))]
BOTH = [m for m in (_corepy, _core) if m is not None]

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(command=1, fam=0x11, body=b"", tlvs=(), crc=False, length=None, version=2):
    """A v2 header: body is the address block; tlvs (type, value) pairs;
    crc appends a correct CRC32C TLV; length overrides the length field."""
    block = body + b"".join(bytes([t]) + struct.pack("!H", len(v)) + v for t, v in tlvs)
    if crc:
        block += b"\x03\x00\x04\x00\x00\x00\x00"
    n = len(block) if length is None else length
    head = SIG + bytes([(version << 4) | command, fam]) + struct.pack("!H", n) + block
    if crc:
        value = _corepy.crc32c(head)
        head = head[:-4] + struct.pack("!I", value)
    return head


def inet4(src="192.0.2.1", dst="198.51.100.7", sport=56324, dport=443):
    return (socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport))


def inet6(src="2001:db8::1", dst="::1", sport=1, dport=65535):
    return (socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
            + struct.pack("!HH", sport, dport))


def outcome(core, data, versions=3, max_v2=pp.DEFAULT_MAX_V2):
    """What a core makes of data: a header, None, or ('error', reason)."""
    try:
        return core.proxy_parse(data, versions, max_v2)
    except ProxyProtocolError as exc:
        return ("error", exc.reason)


def same(data, versions=3, max_v2=pp.DEFAULT_MAX_V2):
    """Both cores' outcome, checked equal."""
    results = [outcome(core, data, versions, max_v2) for core in BOTH]
    assert all(r == results[0] for r in results), (data, results)
    return results[0]


# -- known headers ---------------------------------------------------------

UNIX_SRC = b"/run/client.sock".ljust(108, b"\0")
UNIX_DST = b"\0abstract".ljust(108, b"\0")

VALID = [
    # the spec's own examples and their worst cases
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n",
     dict(version=1, command="PROXY", family=socket.AF_INET, source=("192.168.0.1", 56324),
          destination=("192.168.0.11", 443), length=47)),
    (b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
     dict(source=("255.255.255.255", 65535), length=56)),
    (b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
     b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
     dict(family=socket.AF_INET6, length=104,
          source=("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535, 0, 0))),
    (b"PROXY TCP6 2001:DB8::1 ::1 0 0\r\n",
     dict(source=("2001:db8::1", 0, 0, 0), destination=("::1", 0, 0, 0))),
    (b"PROXY UNKNOWN\r\n", dict(family=socket.AF_UNSPEC, source=None, length=15)),
    (b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
     b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
     dict(family=socket.AF_UNSPEC, source=None, length=107)),
    (v2(body=inet4()), dict(version=2, command="PROXY", family=socket.AF_INET,
                           transport=socket.SOCK_STREAM, source=("192.0.2.1", 56324),
                           destination=("198.51.100.7", 443), length=28, tlvs=())),
    (v2(fam=0x12, body=inet4()), dict(transport=socket.SOCK_DGRAM)),
    (v2(fam=0x21, body=inet6()), dict(family=socket.AF_INET6,
                                      source=("2001:db8::1", 1, 0, 0),
                                      destination=("::1", 65535, 0, 0), length=52)),
    (v2(fam=0x31, body=UNIX_SRC + UNIX_DST),
     dict(family=socket.AF_UNIX, source="/run/client.sock", destination=b"\0abstract")),
    (v2(command=0, fam=0x00), dict(command="LOCAL", family=socket.AF_UNSPEC, source=None,
                                   length=16)),
    # LOCAL: the block is skipped, whatever the family says
    (v2(command=0, fam=0x11, body=b"\xff" * 5), dict(command="LOCAL", source=None, length=21)),
    (v2(command=0, fam=0x11, body=inet4()), dict(command="LOCAL", source=None)),
    # UNSPEC: the block is ignored (not taken for TLVs)
    (v2(command=1, fam=0x00, body=b"ignored"), dict(family=socket.AF_UNSPEC, source=None,
                                                    tlvs=(), length=23)),
    (v2(body=inet4(), tlvs=[(pp.PP2_TYPE_ALPN, b"h2"), (pp.PP2_TYPE_AUTHORITY, b"example.com"),
                            (pp.PP2_TYPE_UNIQUE_ID, b"u" * 128), (pp.PP2_TYPE_NOOP, b"")]),
     dict(alpn=b"h2", authority="example.com", unique_id=b"u" * 128)),
    (v2(body=inet4(), tlvs=[(pp.PP2_TYPE_AUTHORITY, b"a.example")], crc=True),
     dict(authority="a.example")),
    (v2(body=inet4(), tlvs=[(pp.PP2_TYPE_SSL, b"\x07\x00\x00\x00\x00"
                             b"\x21\x00\x07TLSv1.3" b"\x22\x00\x03bob")]),
     dict(ssl={"client": 7, "verify": 0, "version": "TLSv1.3", "cn": "bob"})),
]


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("data,expect", VALID)
def test_valid_headers(core, data, expect):
    header = core.proxy_parse(data)
    assert isinstance(header, ProxyHeader)
    for name, value in expect.items():
        assert getattr(header, name) == value, name
    assert header == same(data)
    # every proper prefix is "read more", never a verdict
    for cut in range(header.length):
        assert core.proxy_parse(data[:cut]) is None, cut
    # what follows the header is not part of it
    assert core.proxy_parse(data[:header.length] + b"payload") == header


INVALID = [
    (b"GET / HTTP/1.1\r\n", "signature"),
    (b"PROXY", None),
    (b"PROXX TCP4", "signature"),
    (b"PROXYTCP4 1.2.3.4 1.2.3.4 1 2\r\n", "signature"),
    (b"\r\n\r\n\x00\r\nQUIX", "signature"),
    (b"\x00", "signature"),
    (b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n", "family"),
    (b"PROXY TCP4\r\n", "syntax"),
    (b"PROXY TCP4X1.2.3.4 1.2.3.4 1 2\r\n", "family"),
    (b"PROXY TCP4  1.2.3.4 1.2.3.4 1 2\r\n", "syntax"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 \r\n", "syntax"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n", "syntax"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3\r\n", "syntax"),
    (b"PROXY TCP4 01.2.3.4 1.2.3.4 1 2\r\n", "address"),
    (b"PROXY TCP4 1.2.3 1.2.3.4 1 2\r\n", "address"),
    (b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n", "address"),
    (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "address"),
    (b"PROXY TCP4 1.2.3.4\x00 1.2.3.4 1 2\r\n", "address"),
    (b"PROXY TCP6 fe80::1%lo ::1 1 2\r\n", "address"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n", "port"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 65536\r\n", "port"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 -2\r\n", "port"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n", None),        # LF alone does not end it
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\r", None),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n\r\n", "port"),
    (b"PROXY UNKNOWN" + b" " * 93 + b"\r\n", "too_long"),
    (b"PROXY TCP4 " + b"1" * 96, "too_long"),
    (b"PROXY UNKNOWNX\r\n", "family"),
    (v2(version=1, body=inet4()), "version"),
    (v2(version=3, body=inet4()), "version"),
    (v2(command=2, body=inet4()), "command"),
    (v2(command=0xF, body=inet4()), "command"),
    (v2(fam=0x13, body=inet4()), "family"),
    (v2(fam=0x10, body=inet4()), "family"),
    (v2(fam=0x41, body=inet4()), "family"),
    (v2(fam=0x01, body=inet4()), "family"),
    (v2(fam=0x11, body=inet4()[:11]), "length"),
    (v2(fam=0x21, body=inet4()), "length"),
    (v2(fam=0x31, body=UNIX_SRC), "length"),
    (v2(body=inet4(), tlvs=[(1, b"h2")])[:-1] + b"", None),   # a prefix: read more
    (v2(body=inet4() + b"\x01\x00"), "tlv"),
    (v2(body=inet4() + b"\x01\x00\x05ab"), "tlv"),
    (v2(body=inet4(), tlvs=[(pp.PP2_TYPE_CRC32C, b"\0\0\0")]), "tlv"),
    (v2(body=inet4(), tlvs=[(pp.PP2_TYPE_UNIQUE_ID, b"u" * 129)]), "tlv"),
    (v2(body=inet4(), tlvs=[(pp.PP2_TYPE_CRC32C, b"\1\2\3\4")]), "crc32c"),
    (v2(body=inet4(), length=pp.DEFAULT_MAX_V2 - 15), "too_long"),
]


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("data,reason", INVALID)
def test_invalid_headers(core, data, reason):
    result = outcome(core, data)
    assert result == (None if reason is None else ("error", reason))
    assert same(data) == result


@pytest.mark.parametrize("core", CORES)
def test_crc32c_known_values(core):
    # RFC 3720 B.4: 32 bytes of zeros; the usual check value
    assert core.crc32c(bytes(32)) == 0x8A9136AA
    assert core.crc32c(b"123456789") == 0xE3069283
    assert core.crc32c(b"56789", core.crc32c(b"1234")) == 0xE3069283


def test_bad_crc_after_a_correct_one_is_caught():
    good = v2(body=inet4(), tlvs=[(pp.PP2_TYPE_AUTHORITY, b"x")], crc=True)
    assert same(good).authority == "x"
    for i in range(len(good)):
        if 12 <= i < 16 or i == len(good) - 7:
            continue        # version/family/length, the CRC TLV's type: other errors
        flipped = good[:i] + bytes([good[i] ^ 0x40]) + good[i + 1:]
        assert same(flipped)[0] == "error", i
    assert same(good[:-1] + bytes([good[-1] ^ 1])) == ("error", "crc32c")


@pytest.mark.parametrize("core", CORES)
def test_versions_and_max_v2(core):
    line = b"PROXY UNKNOWN\r\n"
    assert core.proxy_parse(line, pp.V1).version == 1
    assert outcome(core, line, pp.V2) == ("error", "not_accepted")
    assert outcome(core, v2(command=0), pp.V1) == ("error", "not_accepted")
    assert outcome(core, b"P", pp.V2) == ("error", "not_accepted")   # at the first byte
    assert outcome(core, b"\r\n", pp.V1) == ("error", "not_accepted")
    big = v2(body=inet4(), tlvs=[(pp.PP2_TYPE_NOOP, b"x" * 300)])
    assert outcome(core, big, 3, pp.MIN_MAX_V2) == ("error", "too_long")
    assert core.proxy_parse(big, 3, len(big)).length == len(big)
    assert outcome(core, big, 3, len(big) - 1) == ("error", "too_long")
    with pytest.raises(ValueError, match="versions"):
        core.proxy_parse(line, 4)
    with pytest.raises(ValueError, match="versions"):
        core.proxy_parse(line, 0)
    with pytest.raises(ValueError, match="max_v2=100"):
        core.proxy_parse(line, 3, 100)
    with pytest.raises(ValueError, match="max_v2=65552"):
        core.proxy_parse(line, 3, pp.V2_LIMIT + 1)
    with pytest.raises(TypeError, match="max_v2"):
        core.proxy_parse(line, 3, 1000.0)
    with pytest.raises(ValueError, match="max_v2="):
        core.proxy_parse(line, 3, 2**70)
    assert core.proxy_parse(bytearray(line)).length == 15
    assert core.proxy_parse(memoryview(line)).length == 15
    assert core.proxy_parse(b"") is None


def test_error_names_the_bytes():
    with pytest.raises(ProxyProtocolError) as info:
        _corepy.proxy_parse(b"PROXY TCP9 x\r\n")
    assert info.value.reason == "family"
    assert "TCP9" in str(info.value)
    assert isinstance(info.value, ValueError)


# -- the malformed corpus --------------------------------------------------

def _valid_seeds():
    return [data for data, _ in VALID]


@st.composite
def mutated(draw):
    """A valid header, then broken: truncated, a byte changed, bytes
    inserted or deleted, the length field changed, or garbage appended."""
    data = bytearray(draw(st.sampled_from(_valid_seeds())))
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["cut", "flip", "insert", "delete", "length", "append"]))
        if how == "cut" and data:
            del data[draw(st.integers(0, len(data) - 1)):]
        elif how == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        elif how == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif how == "delete" and data:
            i = draw(st.integers(0, len(data) - 1))
            del data[i:i + draw(st.integers(1, 4))]
        elif how == "length" and len(data) >= 16 and data[:1] == b"\r":
            data[14:16] = struct.pack("!H", draw(st.integers(0, 0xFFFF)))
        elif how == "append":
            data += draw(st.binary(max_size=32))
    return bytes(data)


@st.composite
def v1_lines(draw):
    """Lines that look like v1: the right words, wrong details."""
    word = st.sampled_from(["TCP4", "TCP6", "UNKNOWN", "TCP", "tcp4", ""])
    addr = st.one_of(st.ip_addresses().map(str), st.text("0123456789abcdef.:%", max_size=40))
    port = st.one_of(st.integers(-1, 70000).map(str), st.text("0123456789 ", max_size=6))
    sep = st.sampled_from([" ", "  ", "", "\t"])
    parts = [draw(word), draw(addr), draw(addr), draw(port), draw(port)]
    body = "PROXY" + "".join(draw(sep) + p for p in parts)
    end = draw(st.sampled_from(["\r\n", "\n", "\r", "", "\r\n\r\n"]))
    return (body + end).encode("latin-1")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutated(), v1_lines(), st.binary(max_size=120),
                 st.binary(max_size=80).map(lambda b: SIG + b"\x21" + b)),
       st.sampled_from([1, 2, 3]), st.sampled_from([pp.MIN_MAX_V2, pp.DEFAULT_MAX_V2]))
def test_malformed_corpus_both_cores_agree(data, versions, max_v2):
    result = same(data, versions, max_v2)
    if isinstance(result, ProxyHeader):
        # whatever was accepted is exactly well formed: re-parsing just the
        # header gives it back, and it fits the caps
        assert same(data[:result.length], versions, max_v2) == result
        assert result.length <= (pp.V1_MAX if result.version == 1 else max_v2)
    elif result is None:
        assert len(data) < max(max_v2, pp.V1_MAX)


# -- reading from a socket -------------------------------------------------

def _pair():
    a, b = socket.socketpair()
    return a, b


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("data", [VALID[0][0], VALID[2][0], VALID[4][0],
                                  v2(body=inet4(), tlvs=[(1, b"h2")], crc=True),
                                  v2(fam=0x31, body=UNIX_SRC + UNIX_DST),
                                  v2(command=0)])
def test_read_takes_only_the_header(core, data):
    expect = same(data)
    server, client = _pair()
    with server, client:
        client.sendall(data + b"HELLO")
        header = core.proxy_read(server, timeout=5)
        assert header == expect
        assert server.recv(100) == data[expect.length:] + b"HELLO"


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("timeout", [None, 5.0])
def test_read_header_split_over_many_writes(core, timeout):
    for data in (VALID[2][0], v2(body=inet4(), tlvs=[(2, b"host.example")], crc=True)):
        server, client = _pair()
        with server, client:
            server.settimeout(timeout)

            def trickle():
                for i in range(len(data)):
                    client.send(data[i:i + 1])
                client.send(b"after")

            t = threading.Thread(target=trickle)
            t.start()
            try:
                header = core.proxy_read(server, timeout=10)
            finally:
                t.join()
            assert header == same(data)
            assert server.gettimeout() == timeout       # mode left as it was
            server.settimeout(5)
            assert server.recv(10) == b"after"


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("sent, close, timeout, reason, left", [
    (b"PROXY TCP4 1.2.3.4", False, 0.2, "timeout", b""),
    (SIG[:7], True, 5, "eof", b""),
    # refused at its first byte: the rest is not read
    (b"GET / HTTP/1.0\r\n\r\n", False, 5, "signature", b"ET / HTTP/1.0\r\n\r\n"),
    # never more than 107 bytes of a v1 line are read
    (b"PROXY " + b"A" * 200, False, 5, "too_long", b"A" * (206 - pp.V1_MAX)),
])
def test_read_refuses_late_cut_and_bad_headers(core, sent, close, timeout, reason, left):
    server, client = _pair()
    with server, client:
        client.send(sent)
        if close:
            client.shutdown(socket.SHUT_WR)
        with pytest.raises(ProxyProtocolError) as info:
            core.proxy_read(server, timeout=timeout)
        assert info.value.reason == reason
        server.setblocking(False)
        try:
            rest = server.recv(300)
        except BlockingIOError:
            rest = b""
        assert rest == left


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("timeout", [float("inf"), 1e12, 2**40, None])
def test_read_with_huge_timeouts(core, timeout):
    server, client = _pair()
    with server, client:
        client.send(b"PROXY UNKNOWN\r\n")
        assert core.proxy_read(server, timeout=timeout).length == 15


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("timeout, exc", [(-1, ValueError), (float("nan"), ValueError),
                                          ("3", TypeError)])
def test_read_refuses_bad_timeouts(core, timeout, exc):
    server, client = _pair()
    with server, client:
        with pytest.raises(exc, match="timeout"):
            core.proxy_read(server, timeout=timeout)


@pytest.mark.parametrize("core", CORES)
def test_read_errors_of_the_socket(core):
    server, client = _pair()
    server.close()
    with client:
        with pytest.raises(OSError):
            core.proxy_read(server, timeout=1)
    a, b = socket.socketpair()
    with a, b:
        fd = os.dup(a.fileno())
        a.close()
        os.close(fd)
        with pytest.raises(OSError):
            core.proxy_read(a, timeout=1)
