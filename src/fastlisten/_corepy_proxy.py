"""The pure-Python twin's PROXY protocol parser and reader: the compiled
core's ``_proxy.pxi`` and ``csrc/fl_proxy.c``, line for line, with the same
error codes (``fastlisten.proxy.E_*``)."""

from __future__ import annotations

import errno
import os
import select
import socket as _socket
from time import monotonic
from typing import Any, List, Optional

from fastlisten import proxy as _proxy
from fastlisten._coreshared import remaining, timeout_ms

_POLLIN = select.POLLIN

_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FAMILIES = frozenset((0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32))
_V2_ADDRESS_SIZE = {0: 0, 1: 12, 2: 36, 3: 216}
_ADDRESS_CHARS = frozenset(b"0123456789abcdefABCDEF.:")
_DIGITS = frozenset(b"0123456789")


def _crc32c_table() -> List[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC32C (Castagnoli, RFC 4960 appendix B) of data, continuing from crc."""
    crc ^= 0xFFFFFFFF
    table = _CRC_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _v1_address(field: bytes, family: int) -> Optional[bytes]:
    if not 0 < len(field) <= 45 or not _ADDRESS_CHARS.issuperset(field):
        return None
    try:
        return _socket.inet_pton(_socket.AF_INET if family == 1 else _socket.AF_INET6,
                                 field.decode("ascii"))
    except OSError:
        return None


def _v1_port(field: bytes) -> Optional[int]:
    if not 0 < len(field) <= 5 or (len(field) > 1 and field[0] == 0x30):
        return None
    if not _DIGITS.issuperset(field):
        return None
    value = int(field)
    return value if value <= 65535 else None


def _parse_v1(buf: bytes) -> Any:
    end = buf.find(b"\r\n", 0, _proxy.V1_MAX)
    if end < 0:
        return _proxy.E_TOO_LONG if len(buf) >= _proxy.V1_MAX else 0
    line = buf[6:end]
    length = end + 2
    if line[:7] == b"UNKNOWN" and (len(line) == 7 or line[7:8] == b" "):
        return _proxy.build(1, 1, 0, 0, length, None, b"")
    if line[:4] == b"TCP4":
        family = 1
    elif line[:4] == b"TCP6":
        family = 2
    else:
        return _proxy.E_FAMILY
    if len(line) == 4:
        return _proxy.E_SYNTAX
    if line[4:5] != b" ":
        return _proxy.E_FAMILY
    fields = line[5:].split(b" ")
    if len(fields) != 4 or not all(fields):
        return _proxy.E_SYNTAX
    src, dst = _v1_address(fields[0], family), _v1_address(fields[1], family)
    if src is None or dst is None:
        return _proxy.E_ADDRESS
    sport, dport = _v1_port(fields[2]), _v1_port(fields[3])
    if sport is None or dport is None:
        return _proxy.E_PORT
    return _proxy.build(1, 1, family, 1, length, (src, dst, sport, dport), b"")


def _parse_v2(buf: bytes, max_v2: int) -> Any:
    if len(buf) < 13:
        return 0
    if buf[12] >> 4 != 2:
        return _proxy.E_VERSION
    command = buf[12] & 0x0F
    if command > 1:
        return _proxy.E_COMMAND
    if len(buf) < 14:
        return 0
    if buf[13] not in _V2_FAMILIES:
        return _proxy.E_FAMILY
    family, transport = buf[13] >> 4, buf[13] & 0x0F
    if len(buf) < 16:
        return 0
    total = 16 + ((buf[14] << 8) | buf[15])
    if total > max_v2:
        return _proxy.E_TOO_LONG
    if len(buf) < total:
        return 0
    size = _V2_ADDRESS_SIZE[family]
    if total - 16 < size:
        if command == 1:
            return _proxy.E_LENGTH
        return _proxy.build(2, command, family, transport, total, None, b"")
    if command != 1 or family == 0:
        # LOCAL, UNSPEC: the block is skipped, unread
        return _proxy.build(2, command, family, transport, total, None, b"")
    a = buf[16:16 + size]
    if family == 1:
        addresses = (a[0:4], a[4:8], (a[8] << 8) | a[9], (a[10] << 8) | a[11])
    elif family == 2:
        addresses = (a[0:16], a[16:32], (a[32] << 8) | a[33], (a[34] << 8) | a[35])
    else:
        addresses = (a[0:108], a[108:216], 0, 0)
    start = off = 16 + size
    crc_at = 0
    while off < total:
        if total - off < 3:
            return _proxy.E_TLV
        n = (buf[off + 1] << 8) | buf[off + 2]
        if n > total - off - 3:
            return _proxy.E_TLV
        if buf[off] == 0x03:
            if n != 4 or crc_at:
                return _proxy.E_TLV
            crc_at = off + 3
        elif buf[off] == 0x05 and n > 128:
            return _proxy.E_TLV
        off += 3 + n
    if crc_at:
        crc = crc32c(buf[crc_at + 4:total], crc32c(b"\0\0\0\0", crc32c(buf[:crc_at])))
        if crc != int.from_bytes(buf[crc_at:crc_at + 4], "big"):
            return _proxy.E_CRC32C
    return _proxy.build(2, command, family, transport, total, addresses, buf[start:total])


def _proxy_parse(buf: bytes, versions: int, max_v2: int) -> Any:
    """A ProxyHeader, 0 (a valid beginning: read more) or an error code < 0."""
    if not buf:
        return 0
    if buf[0] == 0x50:          # 'P'
        if buf[:6] != b"PROXY "[:len(buf)]:
            return _proxy.E_SIGNATURE
        if not versions & _proxy.V1:
            return _proxy.E_NOT_ACCEPTED
        return _parse_v1(buf)
    if buf[0] == 0x0D:
        if buf[:12] != _V2_SIGNATURE[:len(buf)]:
            return _proxy.E_SIGNATURE
        if not versions & _proxy.V2:
            return _proxy.E_NOT_ACCEPTED
        return _parse_v2(buf, max_v2)
    return _proxy.E_SIGNATURE


def proxy_parse(data: Any, versions: int = _proxy.V1 | _proxy.V2,
                max_v2: int = _proxy.DEFAULT_MAX_V2) -> Optional[_proxy.ProxyHeader]:
    """Parse a PROXY protocol header at the start of ``data`` (bytes-like).

    Returns a :class:`fastlisten.proxy.ProxyHeader` when data starts with a
    complete valid header (``header.length`` bytes of it; the rest is the
    client's), None when data is a valid beginning of one (more bytes are
    needed), and raises :class:`fastlisten.proxy.ProxyProtocolError` when it
    is not and cannot become one.  ``versions``: V1, V2 or V1 | V2;
    ``max_v2``: the largest v2 header accepted, in bytes.
    """
    _proxy.check_args(versions, max_v2)
    buf = bytes(data)
    result = _proxy_parse(buf, versions, max_v2)
    if type(result) is int:
        if result < 0:
            raise _proxy.error(result, buf)
        return None
    return result


def _proxy_take(sock: _socket.socket, buf: bytearray, cap: int) -> int:
    """One step of reading a header (fl_proxy_take): take from what has
    arrived only bytes that belong to the header.  Returns the count taken,
    0 at end of file; raises BlockingIOError when nothing has arrived."""
    have = len(buf)
    peeked = sock.recv(cap - have, _socket.MSG_PEEK | _socket.MSG_DONTWAIT)
    if not peeked:
        return 0
    seen = bytes(buf) + peeked
    if seen[0] == 0x50:
        end = seen.find(b"\r\n", max(have - 1, 0))
        k = end + 2 - have if end >= 0 else len(peeked)
        if have + k > _proxy.V1_MAX:
            k = _proxy.V1_MAX - have if have < _proxy.V1_MAX else 1
    elif seen[0] == 0x0D:
        if len(seen) < 16:
            k = len(peeked)
        else:
            total = 16 + ((seen[14] << 8) | seen[15])
            k = min(total - have if total > have else 1, len(peeked))
    else:
        k = 1
    taken = sock.recv(k, _socket.MSG_DONTWAIT)
    buf += taken
    return len(taken)


def proxy_read(sock: _socket.socket, versions: int = _proxy.V1 | _proxy.V2,
               timeout: Optional[float] = _proxy.DEFAULT_TIMEOUT,
               max_v2: int = _proxy.DEFAULT_MAX_V2) -> _proxy.ProxyHeader:
    """Read one PROXY protocol header from the connected socket ``sock``.

    Takes only the header's bytes (v1: nothing past its CRLF; v2: nothing
    past 16 + its length), whatever the socket's blocking mode, and waits
    at most ``timeout`` seconds in all (None: for ever).  Raises
    :class:`fastlisten.proxy.ProxyProtocolError` for a bad header, one that
    does not arrive in time (reason 'timeout') or a connection closed
    before a complete header ('eof'); OSError for a failing socket.
    Signals interrupt the wait; their handlers run and it goes on.
    """
    _proxy.check_args(versions, max_v2)
    ms = timeout_ms(timeout)
    deadline = None if timeout is None else monotonic() + timeout
    cap = max(max_v2, _proxy.V1_MAX)
    buf = bytearray()
    fd = sock.fileno()
    if fd < 0:      # closed: what recv() on it raises
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))
    poller = select.poll()
    poller.register(fd, _POLLIN)
    # With a timeout, the socket module waits before recv() even with
    # MSG_DONTWAIT: make it non-blocking meanwhile (the C core does not
    # go through the socket object).
    sock_timeout = sock.gettimeout()
    if sock_timeout:
        sock.settimeout(0.0)
    try:
        return _proxy_read_loop(sock, buf, cap, versions, max_v2, poller, deadline, ms)
    finally:
        if sock_timeout:
            sock.settimeout(sock_timeout)


def _proxy_read_loop(sock: _socket.socket, buf: bytearray, cap: int, versions: int,
                     max_v2: int, poller: Any, deadline: Optional[float],
                     ms: int) -> _proxy.ProxyHeader:
    while True:
        try:
            n = _proxy_take(sock, buf, cap)
        except BlockingIOError:
            n = -1
        if n == 0:
            raise _proxy.error(_proxy.E_EOF, buf)
        if n > 0:
            result = _proxy_parse(bytes(buf), versions, max_v2)
            if type(result) is not int:
                return result
            if result < 0:
                raise _proxy.error(result, buf)
            continue        # more may have arrived already
        if deadline is not None:
            ms = timeout_ms(remaining(deadline))
        if ms == 0 or not poller.poll(ms):
            if deadline is None or remaining(deadline) > 0:
                continue
            raise _proxy.error(_proxy.E_TIMEOUT, buf)
