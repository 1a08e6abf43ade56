"""The PROXY protocol (HAProxy's ``doc/proxy-protocol.txt``): what a parsed
header looks like, and the errors, shared by both cores.

A load balancer that opens the connection to a server tells it who the real
client is by sending a PROXY header first: a v1 text line
(``PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\\r\\n``, at most 107 bytes)
or a v2 binary header (a 12-byte signature, version/command, family, a
16-bit length, the addresses, then TLVs).  The cores parse and read it::

    import fastlisten
    header = fastlisten.proxy_parse(b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\\r\\n")
    header.source           # ('192.0.2.1', 56324)
    header = fastlisten.proxy_read(conn, versions=V1 | V2, timeout=3.0)

(the core's functions, whichever core is in use).
``proxy_parse(data, versions=V1|V2, max_v2=DEFAULT_MAX_V2)`` returns a
:class:`ProxyHeader` when ``data`` starts with a complete valid header,
None when it is a valid beginning of one, and raises
:class:`ProxyProtocolError` when it is not.  ``proxy_read(sock, versions,
timeout, max_v2)`` reads one header from a connected socket, taking only
the header's bytes (whatever the client sent after it stays in the socket
for the handler), within ``timeout`` seconds.

The socketserver classes use them when their ``listen_config`` sets
``proxy_protocol`` (see :class:`fastlisten.ListenConfig`); this module
holds no socket code of its own.
"""

from __future__ import annotations

import socket
from typing import Any, Dict, NamedTuple, Optional, Tuple

from fastlisten.address import decode_unix_path

__all__ = [
    "V1", "V2", "DEFAULT_TIMEOUT", "DEFAULT_MAX_V2", "MIN_MAX_V2", "V2_LIMIT",
    "ProxyHeader", "ProxyProtocolError", "REASONS",
    "PP2_TYPE_ALPN", "PP2_TYPE_AUTHORITY", "PP2_TYPE_CRC32C", "PP2_TYPE_NOOP",
    "PP2_TYPE_UNIQUE_ID", "PP2_TYPE_SSL", "PP2_TYPE_NETNS",
]

#: Version bits for ``versions``: V1, V2, or V1 | V2 (told apart by their first bytes).
V1 = 1
V2 = 2

#: Seconds a receiver waits for the header by default (the spec: at least 3 s,
#: to cover a TCP retransmission).
DEFAULT_TIMEOUT = 3.0
#: Default cap on a v2 header's total size (16 bytes + its length field):
#: the largest address block (216 bytes, AF_UNIX) plus room for the TLVs a
#: balancer sends (ALPN, AUTHORITY, UNIQUE_ID up to 128 bytes, SSL with the
#: client certificate's CN, CRC32C).
DEFAULT_MAX_V2 = 2048
#: The smallest max_v2 allowed: an AF_UNIX header without TLVs must fit.
MIN_MAX_V2 = 16 + 216
#: The largest v2 header there can be.
V2_LIMIT = 16 + 65535
#: v1 lines are at most this long, CRLF included.
V1_MAX = 107

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_TYPE_NETNS = 0x30
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_SUBTYPE_SSL_SIG_ALG = 0x24
PP2_SUBTYPE_SSL_KEY_ALG = 0x25

#: Error codes: the C core's FL_PROXY_E_* (csrc/fl_proxy.h), the same numbers.
E_SIGNATURE = -1
E_VERSION = -2
E_COMMAND = -3
E_FAMILY = -4
E_ADDRESS = -5
E_PORT = -6
E_TOO_LONG = -7
E_LENGTH = -8
E_TLV = -9
E_CRC32C = -10
E_NOT_ACCEPTED = -11
E_SYNTAX = -12
#: ... and two that come from reading, not parsing.
E_EOF = -13
E_TIMEOUT = -14

#: Error code -> (reason, what it means).
REASONS: Dict[int, Tuple[str, str]] = {
    E_SIGNATURE: ("signature", "neither a v1 'PROXY ' line nor the v2 signature"),
    E_VERSION: ("version", "v2 version is not 2"),
    E_COMMAND: ("command", "v2 command is neither LOCAL nor PROXY"),
    E_FAMILY: ("family", "unknown address family or transport"),
    E_ADDRESS: ("address", "v1 address is not valid for its family"),
    E_PORT: ("port", "v1 port is not 0-65535 written without leading zeros"),
    E_TOO_LONG: ("too_long", "header longer than allowed (v1: no CRLF in 107 bytes; "
                             "v2: over max_v2)"),
    E_LENGTH: ("length", "v2 length is shorter than the address block"),
    E_TLV: ("tlv", "a v2 TLV overruns the header or has a bad size"),
    E_CRC32C: ("crc32c", "v2 CRC32C checksum does not match"),
    E_NOT_ACCEPTED: ("not_accepted", "a PROXY protocol version this receiver is not configured for"),
    E_SYNTAX: ("syntax", "v1 line is not exactly as the specification writes it"),
    E_EOF: ("eof", "the connection closed before a complete header"),
    E_TIMEOUT: ("timeout", "no complete header within the deadline"),
}

#: The header's family and transport numbers as the socket module's constants.
FAMILIES = (socket.AF_UNSPEC, socket.AF_INET, socket.AF_INET6, getattr(socket, "AF_UNIX", 1))
TRANSPORTS = (0, socket.SOCK_STREAM, socket.SOCK_DGRAM)


class ProxyProtocolError(ValueError):
    """A PROXY protocol header that is malformed, not allowed, incomplete
    at end of file or late.  ``reason`` is a short code (``REASONS``):
    'signature', 'version', 'command', 'family', 'address', 'port',
    'too_long', 'length', 'tlv', 'crc32c', 'not_accepted', 'syntax',
    'eof', 'timeout'."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def error(code: int, data: Any = None) -> ProxyProtocolError:
    """The ProxyProtocolError for an error code of either core."""
    reason, text = REASONS[code]
    if data:
        text = f"{text}: {bytes(data[:V1_MAX])!r}"
    return ProxyProtocolError(reason, f"bad PROXY protocol header ({reason}): {text}")


def check_args(versions: Any, max_v2: Any) -> None:
    """Validate proxy_parse's/proxy_read's ``versions`` and ``max_v2``."""
    if isinstance(versions, bool) or not isinstance(versions, int):
        raise TypeError(f"versions must be V1, V2 or V1 | V2, not {versions!r}")
    if versions not in (V1, V2, V1 | V2):
        raise ValueError(f"versions must be V1 (1), V2 (2) or V1 | V2 (3), not {versions!r}")
    if isinstance(max_v2, bool) or not isinstance(max_v2, int):
        raise TypeError(f"max_v2 must be an integer number of bytes, not {max_v2!r}")
    if not MIN_MAX_V2 <= max_v2 <= V2_LIMIT:
        raise ValueError(f"max_v2={max_v2} is out of range: it must be between "
                         f"{MIN_MAX_V2} and {V2_LIMIT} bytes")


def unix_address(raw: bytes) -> Any:
    """A v2 AF_UNIX address (108 bytes, NUL-padded; a leading NUL: an
    abstract name) as the socket module reports one."""
    return decode_unix_path(raw[:108].rstrip(b"\0"))


def _address(family: int, raw: bytes, port: int) -> Any:
    if family == 1:
        return (socket.inet_ntop(socket.AF_INET, raw[:4]), port)
    if family == 2:
        return (socket.inet_ntop(socket.AF_INET6, raw[:16]), port, 0, 0)
    return unix_address(raw)


def build(version: int, command: int, family: int, transport: int, length: int,
          addresses: Optional[Tuple[bytes, bytes, int, int]], tlv_block: bytes) -> "ProxyHeader":
    """A ProxyHeader from what the pure-Python parser found (its checks done;
    the compiled core builds the same in C):
    ``addresses`` is (src, dst, sport, dport) in wire form, or None;
    ``tlv_block`` the TLV bytes, already checked to be well formed."""
    tlvs = []
    i, end = 0, len(tlv_block)
    while i < end:
        n = (tlv_block[i + 1] << 8) | tlv_block[i + 2]
        tlvs.append((tlv_block[i], bytes(tlv_block[i + 3:i + 3 + n])))
        i += 3 + n
    source = destination = None
    if addresses is not None:
        source = _address(family, addresses[0], addresses[2])
        destination = _address(family, addresses[1], addresses[3])
    return ProxyHeader(version, "PROXY" if command else "LOCAL", FAMILIES[family],
                       TRANSPORTS[transport], source, destination, tuple(tlvs), length)


class ProxyHeader(NamedTuple):
    """One parsed PROXY protocol header.

    - ``version``: 1 or 2.
    - ``command``: 'PROXY' (a relayed connection) or 'LOCAL' (the proxy's
      own, such as a health check: the connection's real peer stands).
    - ``family``: socket.AF_INET, AF_INET6, AF_UNIX, or AF_UNSPEC (v1
      UNKNOWN, v2 UNSPEC: the real peer stands).
    - ``transport``: socket.SOCK_STREAM, SOCK_DGRAM, or 0 (unspecified).
    - ``source``/``destination``: the original client's and server's
      addresses in the socket module's form (``(host, port)``, ``(host,
      port, 0, 0)`` for IPv6, a path str for AF_UNIX), or None when the
      header carries none to believe (LOCAL, UNKNOWN, UNSPEC).
    - ``tlvs``: the v2 TLVs as ``(type, value)`` pairs in the order sent
      (CRC32C, if present, has been verified); ``tlv(type)`` finds one.
    - ``length``: the header's size in bytes.
    """

    version: int
    command: str
    family: int
    transport: int
    source: Any
    destination: Any
    tlvs: Tuple[Tuple[int, bytes], ...]
    length: int

    def tlv(self, type: int) -> Optional[bytes]:
        """The value of the first TLV of this type, or None."""
        for t, value in self.tlvs:
            if t == type:
                return value
        return None

    @property
    def alpn(self) -> Optional[bytes]:
        """PP2_TYPE_ALPN: the protocol the client negotiated (e.g. b'h2')."""
        return self.tlv(PP2_TYPE_ALPN)

    @property
    def authority(self) -> Optional[str]:
        """PP2_TYPE_AUTHORITY: the host name the client asked for (TLS SNI)."""
        value = self.tlv(PP2_TYPE_AUTHORITY)
        return None if value is None else value.decode("utf-8", "replace")

    @property
    def unique_id(self) -> Optional[bytes]:
        """PP2_TYPE_UNIQUE_ID: the proxy's id for the connection."""
        return self.tlv(PP2_TYPE_UNIQUE_ID)

    @property
    def ssl(self) -> Optional[Dict[str, Any]]:
        """PP2_TYPE_SSL, decoded: {'client': flags, 'verify': 0 if the client
        certificate verified, 'version': 'TLSv1.3', 'cn': ..., 'cipher':
        ..., 'sig_alg': ..., 'key_alg': ...} (the sub-TLVs present), or None.
        A malformed SSL TLV gives {'client': ..., 'verify': ..., 'raw': value}."""
        value = self.tlv(PP2_TYPE_SSL)
        if value is None or len(value) < 5:
            return None
        out: Dict[str, Any] = {"client": value[0],
                               "verify": int.from_bytes(value[1:5], "big")}
        names = {PP2_SUBTYPE_SSL_VERSION: "version", PP2_SUBTYPE_SSL_CN: "cn",
                 PP2_SUBTYPE_SSL_CIPHER: "cipher", PP2_SUBTYPE_SSL_SIG_ALG: "sig_alg",
                 PP2_SUBTYPE_SSL_KEY_ALG: "key_alg"}
        i = 5
        while i < len(value):
            if len(value) - i < 3:
                return {**out, "raw": value}
            n = (value[i + 1] << 8) | value[i + 2]
            if i + 3 + n > len(value):
                return {**out, "raw": value}
            name = names.get(value[i])
            if name is not None:
                out[name] = value[i + 3:i + 3 + n].decode("utf-8", "replace")
            i += 3 + n
        return out

