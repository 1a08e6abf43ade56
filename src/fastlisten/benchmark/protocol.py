"""What the benchmark's clients and servers say to each other.

Every server under test answers with exactly these bytes, so that the only
difference between two rows of the table is the server.
"""

from __future__ import annotations

from typing import Dict

#: The scenarios, in the order the report lists them.
SCENARIOS = ("daytime", "echo", "http-close", "burst")

#: daytime and burst: the server writes this line (40 bytes) and closes.
REPLY = b"fastlisten bench: the time is now, bye\r\n"

#: echo: the client sends this line and reads it back.
ECHO_LINE = b"fastlisten bench echo line 0123456789\r\n"

#: http-close: one HTTP/1.0 request per connection; the server answers and closes.
HTTP_REQUEST = b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\nUser-Agent: fastlisten-bench\r\n\r\n"
HTTP_RESPONSE = (b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n"
                 b"Content-Length: 3\r\nConnection: close\r\n\r\nok\n")


def request_for(scenario: str) -> bytes:
    """The bytes a client sends once connected."""
    return {"echo": ECHO_LINE, "http-close": HTTP_REQUEST}.get(scenario, b"")


def reply_for(scenario: str) -> bytes:
    """The bytes a client must receive before EOF for a connection to count."""
    replies: Dict[str, bytes] = {"echo": ECHO_LINE, "http-close": HTTP_RESPONSE}
    return replies.get(scenario, REPLY)
