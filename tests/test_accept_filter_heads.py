"""The accept filter's judge (``ready_check``), on a hypothesis corpus of
heads: the compiled core (csrc/fl_filter.c) and its pure twin give the same
verdict on everything, and the verdicts mean what the rules say: every cut
of a head short of its end waits, the whole head is ready, a head longer
than the cap is oversize, and a PROXY header in front changes nothing but
its own validity."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastlisten import _corepy
from fastlisten.proxy import V1, V2

try:
    from fastlisten import _core
except ImportError:         # FASTLISTEN_NO_EXTENSIONS=1 or not built
    _core = None

CORES = [_corepy] + ([_core] if _core is not None else [])
RULES = ["none", "data", "line", "http", "tls"]
PROXY_V1 = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n"
PROXY_V2 = (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c"
            b"\xc0\x00\x02\x01\xc6\x33\x64\x07\xdb\xf4\x01\xbb")
# LOCAL headers, as a balancer's health check sends them: no address block,
# and one with an (ignored) IPv4 block
LOCAL_V2 = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"
LOCAL_V2_INET = (b"\r\n\r\n\x00\r\nQUIT\n\x20\x11\x00\x0c"
                 b"\x7f\x00\x00\x01\x7f\x00\x00\x01\x00\x50\x00\x50")

token = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-",
                min_size=1, max_size=12)


@st.composite
def http_heads(draw):
    """A request head with HTTP/1.x, its header lines and the empty line,
    with CRLF or bare LF line ends."""
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    method = draw(st.sampled_from(["GET", "POST", "HEAD", "OPTIONS"]))
    path = "/" + draw(st.text(alphabet="abc/._~%0123456789", max_size=30))
    version = draw(st.sampled_from(["HTTP/1.0", "HTTP/1.1"]))
    lines = [f"{method} {path} {version}".encode()]
    for name, value in draw(st.lists(st.tuples(token, token), max_size=8)):
        lines.append(f"{name}: {value}".encode())
    return eol.join(lines) + eol + eol


def both(data, rule, **options):
    """The verdict, asserted the same on every core."""
    verdicts = {core.__name__: core.ready_check(data, rule, **options) for core in CORES}
    assert len(set(verdicts.values())) == 1, verdicts
    return next(iter(verdicts.values()))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(http_heads(), st.binary(max_size=200),
                 st.binary(max_size=40).map(lambda b: b"\x16\x03\x01" + b)),
       st.sampled_from(RULES), st.integers(1, 300), st.sampled_from([0, V1, V2, V1 | V2]),
       st.booleans(), st.sampled_from([b"", PROXY_V1, PROXY_V2]))
def test_both_cores_agree_on_everything(data, rule, max_bytes, proxy, eof, prefix):
    both(prefix + data, rule, max_bytes=max_bytes, proxy=proxy, eof=eof)


@settings(max_examples=200, deadline=None)
@given(http_heads(), st.sampled_from([b"", PROXY_V1, PROXY_V2]))
def test_a_head_waits_until_its_last_byte(head, prefix):
    proxy = V1 | V2 if prefix else 0
    whole = prefix + head
    for cut in range(len(prefix), len(whole)):
        assert both(whole[:cut], "http", proxy=proxy) == "wait", whole[:cut]
    assert both(whole, "http", proxy=proxy) == "ready"
    assert both(whole + b"body", "http", proxy=proxy) == "ready"
    # a cap one byte short of the head: oversize once that much has come
    assert both(whole, "http", max_bytes=len(head) - 1, proxy=proxy) == "oversize"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=100).filter(lambda b: b"\n" not in b), st.integers(1, 200))
def test_a_line_is_ready_with_its_newline_within_the_cap(text, max_bytes):
    line = text + b"\n"
    verdict = both(line, "line", max_bytes=max_bytes)
    assert verdict == ("ready" if len(line) <= max_bytes else "oversize")
    if text:
        assert both(text, "line", max_bytes=max_bytes) == (
            "oversize" if len(text) >= max_bytes else "wait")
        # the peer shut its side: what it sent is all there will be
        assert both(text, "line", max_bytes=max_bytes, eof=True) == (
            "oversize" if len(text) >= max_bytes else "ready")


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=4, max_size=600).map(lambda body: b"\x01" + body[1:]))
def test_a_tls_record_is_ready_when_whole(body):
    record = b"\x16\x03\x01" + len(body).to_bytes(2, "big") + body
    for cut in range(len(record)):
        assert both(record[:cut], "tls") == "wait"
    assert both(record, "tls") == "ready"


@pytest.mark.parametrize("data, rule, options, verdict", [
    (b"", "data", {}, "wait"),
    (b"", "data", {"eof": True}, "closed"),
    (b"", "none", {}, "ready"),
    (PROXY_V1, "data", {"proxy": V1}, "wait"),
    (PROXY_V1, "data", {"proxy": V1, "eof": True}, "closed"),
    (PROXY_V1 + b"x", "data", {"proxy": V1}, "ready"),
    (PROXY_V1[:20], "none", {"proxy": V1}, "wait"),
    (PROXY_V1, "none", {"proxy": V1}, "ready"),
    (PROXY_V2 + b"x", "data", {"proxy": V1}, "malformed"),     # not the version asked
    (b"GET / HTTP/1.1\r\n\r\n", "data", {"proxy": V1 | V2}, "malformed"),
    (b"GET / HTTP/1.1\r\n", "http", {}, "wait"),
    (b"GET / HTTP/1.1\r\n\r\n", "http", {}, "ready"),
    (b"GET / HTTP/1.1\n\r\n", "http", {}, "ready"),
    (b"GET /\r\n", "http", {}, "ready"),                       # HTTP/0.9
    (b"GET / HTTP/1.1\r\nHost: x\r\n", "http", {"eof": True}, "ready"),
    (b"\x16\x03\x01\x00\x04\x01\x00\x00\x00", "tls", {}, "ready"),
    (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "tls", {}, "malformed"),   # ServerHello
    (b"\x16\x02", "tls", {}, "malformed"),
    (b"\x17", "tls", {}, "malformed"),
    (b"\x16\x03\x01\x40\x01", "tls", {}, "malformed"),          # over 2^14
    (b"\x16\x03\x01\x00\x03", "tls", {}, "malformed"),          # too short to be a hello
    (b"\x16\x03\x01\x00\x10\x01", "tls", {"eof": True}, "closed"),
    # a LOCAL header (a health check) needs something after it, whatever the rule
    (LOCAL_V2, "none", {"proxy": V2}, "wait"),
    (LOCAL_V2, "none", {"proxy": V2, "eof": True}, "closed"),
    (LOCAL_V2_INET, "none", {"proxy": V1 | V2}, "wait"),
    (LOCAL_V2_INET, "none", {"proxy": V1 | V2, "eof": True}, "closed"),
    (LOCAL_V2 + b"x", "none", {"proxy": V2}, "ready"),
    (LOCAL_V2 + b"x", "data", {"proxy": V2}, "ready"),
    (LOCAL_V2 + b"x", "line", {"proxy": V2}, "wait"),
    (LOCAL_V2 + b"x", "line", {"proxy": V2, "eof": True}, "ready"),
    (LOCAL_V2 + b"x\n", "line", {"proxy": V2}, "ready"),
    (LOCAL_V2, "tls", {"proxy": V2, "eof": True}, "closed"),
    (PROXY_V2, "none", {"proxy": V2}, "ready"),                # PROXY: the header is enough
    (PROXY_V1, "none", {"proxy": V1}, "ready"),
])
def test_verdicts(data, rule, options, verdict):
    assert both(data, rule, **options) == verdict


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([LOCAL_V2, LOCAL_V2_INET]), st.binary(max_size=120),
       st.sampled_from(RULES), st.integers(1, 200), st.booleans())
def test_after_a_local_header_the_rule_judges_what_follows_never_the_header_alone(
        local, data, rule, max_bytes, eof):
    verdict = both(local + data, rule, max_bytes=max_bytes, proxy=V1 | V2, eof=eof)
    if data:
        assert verdict == both(data, rule, max_bytes=max_bytes, eof=eof)
    else:
        assert verdict == ("closed" if eof else "wait")
