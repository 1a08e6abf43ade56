"""ListenConfig: every option checked once, with the stdlib's exception type
for the same mistake, naming the value; never a crash, a hang or a leaked
descriptor (the autouse fixture in conftest.py checks descriptors)."""

import errno
import socket
import ssl
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastlisten
from fastlisten.address import parse as parse_bind
from fastlisten.commands.options import add_arguments, from_args
from fastlisten.config import ListenConfig, systemd_fds
from fastlisten.errors import FastlistenWarning

HUGE = 2**40

# (options, exception, text the message must contain)
INVALID = [
    # where
    (dict(host=5), TypeError, "host"),
    (dict(host=b"127.0.0.1"), TypeError, "host"),
    (dict(host="::1::2"), ValueError, "::1::2"),
    (dict(host="a\0b"), ValueError, "host"),
    (dict(host=" 127.0.0.1"), ValueError, "127.0.0.1"),
    (dict(host="127.0.0.1", family="ipv6"), ValueError, "127.0.0.1"),
    (dict(host="::1", family=socket.AF_INET), ValueError, "::1"),
    (dict(port="80"), TypeError, "'80'"),
    (dict(port=80.0), TypeError, "80.0"),
    (dict(port=True), TypeError, "True"),
    (dict(proxy_protocol="v2", proxy_max_v2=True), TypeError, "True"),
    (dict(port=None), TypeError, "None"),
    (dict(port=-1), OverflowError, "-1"),
    (dict(port=65536), OverflowError, "65536"),
    (dict(port=HUGE), OverflowError, str(HUGE)),
    (dict(path=5), TypeError, "path"),
    (dict(path=""), ValueError, "path"),
    (dict(path="a\0b"), ValueError, "null"),
    (dict(path="/tmp/" + "x" * 200), OSError, "too long"),
    (dict(path="/tmp/s.sock", port=80), ValueError, "s.sock"),
    (dict(path="/tmp/s.sock", host="127.0.0.1"), ValueError, "s.sock"),
    (dict(path="/tmp/s.sock", family="ipv4"), ValueError, "AF_INET"),
    (dict(fd=-1), ValueError, "-1"),
    (dict(fd="3"), ValueError, "'3'"),
    (dict(fd=3.0), TypeError, "3.0"),
    (dict(fd=HUGE), OverflowError, str(HUGE)),
    (dict(fd=3, host="127.0.0.1"), ValueError, "fd=3"),
    (dict(fd=3, port=80), ValueError, "fd=3"),
    (dict(fd=3, reuse_port=True), ValueError, "reuse_port"),
    # family
    (dict(family="ipx"), ValueError, "'ipx'"),
    (dict(family=12345), OSError, "12345"),
    (dict(family=2.0), TypeError, "2.0"),
    (dict(family=True), TypeError, "True"),
    (dict(family="unix", host="127.0.0.1"), ValueError, "127.0.0.1"),
    (dict(dualstack="yes"), TypeError, "'yes'"),
    (dict(dualstack=1), TypeError, "dualstack"),
    (dict(dualstack=True, host="127.0.0.1"), ValueError, "AF_INET"),
    # the listener
    (dict(backlog="5"), TypeError, "'5'"),
    (dict(backlog=5.0), TypeError, "5.0"),
    (dict(backlog=2**31), OverflowError, str(2**31)),
    (dict(backlog=-HUGE), OverflowError, str(-HUGE)),
    (dict(rcvbuf=0), ValueError, "rcvbuf=0"),
    (dict(rcvbuf=-1), ValueError, "rcvbuf=-1"),
    (dict(rcvbuf="1k"), TypeError, "'1k'"),
    (dict(sndbuf=2**31), OverflowError, str(2**31)),
    (dict(sndbuf=0.5), TypeError, "0.5"),
    (dict(defer_accept=-1), ValueError, "defer_accept=-1"),
    (dict(defer_accept=1.5), TypeError, "1.5"),
    (dict(defer_accept=HUGE), OverflowError, str(HUGE)),
    (dict(fastopen=-1), ValueError, "fastopen=-1"),
    (dict(fastopen="5"), TypeError, "'5'"),
    (dict(fastopen=2**32), OverflowError, str(2**32)),
    (dict(unix_mode=0o600), ValueError, "0o600"),   # not a Unix socket
    (dict(path="/tmp/s.sock", unix_mode=0o10000), ValueError, "0o10000"),
    (dict(path="/tmp/s.sock", unix_mode="600"), TypeError, "'600'"),
    (dict(path=b"\0abstract", unix_mode=0o600), ValueError, "abstract"),
    (dict(path="\0abstract", unix_mode=0o600), ValueError, "abstract"),
    (dict(path="/tmp/s.sock", nodelay=True), ValueError, "nodelay"),
    (dict(path="/tmp/s.sock", keepalive=True), ValueError, "keepalive"),
    (dict(path="/tmp/s.sock", defer_accept=1), ValueError, "defer_accept"),
    (dict(path="/tmp/s.sock", fastopen=1), ValueError, "fastopen"),
    (dict(path="/tmp/s.sock", reuse_port=True), ValueError, "reuse_port"),
    # behind a load balancer
    (dict(proxy_protocol="v3"), ValueError, "'v3'"),
    (dict(proxy_protocol="V1"), ValueError, "'V1'"),
    (dict(proxy_protocol=2), TypeError, "int"),
    (dict(trusted_proxies="10.0.0.0/8"), ValueError, "without proxy_protocol"),
    (dict(proxy_protocol="v1", trusted_proxies="10.0.0.1/8"), ValueError, "10.0.0.1/8"),
    (dict(proxy_protocol="v1", trusted_proxies="10.0.0.0/33"), ValueError, "10.0.0.0/33"),
    (dict(proxy_protocol="v1", trusted_proxies="10.0.0.0/8,"), ValueError, "''"),
    (dict(proxy_protocol="v1", trusted_proxies=[]), ValueError, "trusts nobody"),
    (dict(proxy_protocol="v1", trusted_proxies=[5]), TypeError, "5"),
    (dict(proxy_protocol="v1", trusted_proxies=5), TypeError, "5"),
    (dict(proxy_timeout=3), ValueError, "without proxy_protocol"),
    (dict(proxy_protocol="v2", proxy_timeout=0), ValueError, "proxy_timeout=0"),
    (dict(proxy_protocol="v2", proxy_timeout=float("nan")), ValueError, "nan"),
    (dict(proxy_protocol="v2", proxy_timeout="3"), TypeError, "'3'"),
    (dict(proxy_max_v2=4096), ValueError, "without proxy_protocol"),
    (dict(proxy_protocol="v2", proxy_max_v2=100), ValueError, "proxy_max_v2=100"),
    (dict(proxy_protocol="v2", proxy_max_v2=70000), OverflowError, "70000"),
    (dict(proxy_protocol="v2", proxy_max_v2=1.5), TypeError, "1.5"),
    # the accept filter
    (dict(ready_rule="HTTP"), ValueError, "'HTTP'"),
    (dict(ready_rule=3), TypeError, "int"),
    (dict(ready_timeout=3), ValueError, "without ready_rule"),
    (dict(ready_rule="http", ready_timeout=0), ValueError, "ready_timeout=0"),
    (dict(ready_rule="http", ready_timeout=float("inf")), ValueError, "inf"),
    (dict(ready_rule="http", ready_timeout=2e6), ValueError, "2000000.0"),
    (dict(ready_rule="http", ready_timeout="3"), TypeError, "'3'"),
    (dict(ready_max_bytes=100), ValueError, "without ready_rule"),
    (dict(ready_rule="line", ready_max_bytes=0), ValueError, "ready_max_bytes=0"),
    (dict(ready_rule="line", ready_max_bytes=2**21), OverflowError, str(2**21)),
    (dict(ready_min_rate=100), ValueError, "without ready_rule"),
    (dict(ready_rule="line", ready_min_rate=-1), ValueError, "ready_min_rate=-1"),
    (dict(ready_rule="line", ready_min_rate="5"), TypeError, "'5'"),
    (dict(ready_rule="line", ready_max_bytes=1.5), TypeError, "1.5"),
    (dict(max_waiting=10), ValueError, "without ready_rule"),
    (dict(ready_rule="data", max_waiting=0), ValueError, "max_waiting=0"),
    (dict(ready_rule="data", max_waiting="9"), TypeError, "'9'"),
    # TLS
    (dict(ssl_context="cert.pem"), TypeError, "'cert.pem'"),
    (dict(ssl_context=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)), ValueError, "client context"),
    (dict(ssl_context=ssl.create_default_context()), ValueError, "client context"),
    (dict(handshake_timeout=5), ValueError, "without ssl_context"),
    (dict(ssl_context=ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), handshake_timeout=0),
     ValueError, "handshake_timeout=0"),
    (dict(ssl_context=ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), handshake_timeout="10"),
     TypeError, "'10'"),
    # the handler deadline
    (dict(handler_timeout=0), ValueError, "handler_timeout=0"),
    (dict(handler_timeout=-1.5), ValueError, "handler_timeout=-1.5"),
    (dict(handler_timeout=float("nan")), ValueError, "nan"),
    (dict(handler_timeout="30"), TypeError, "'30'"),
] + [
    (dict({name: value}), TypeError, name)
    for name in ("reuse_address", "reuse_port", "nodelay", "keepalive", "unlink_stale")
    for value in ("no", None, 0)
]


@pytest.mark.parametrize("options, exc, text", INVALID,
                         ids=[repr(o)[:60] for o, _, _ in INVALID])
def test_invalid_values_raise_the_stdlib_exception_naming_them(options, exc, text):
    with pytest.raises(exc) as info:
        ListenConfig(**options)
    assert type(info.value) is exc      # the class itself, not a subclass of it
    assert text in str(info.value)
    # the same through listen(): nothing opened, nothing leaked
    with pytest.raises(exc):
        fastlisten.listen(**options)


def test_every_option_has_an_invalid_case():
    tried = {name for options, _, _ in INVALID for name in options}
    fields = {f for f in ListenConfig.__dataclass_fields__ if not f.startswith("_")}
    assert fields <= tried


def test_a_platform_without_an_option_fails_with_a_clear_message(monkeypatch):
    monkeypatch.delattr(socket, "TCP_DEFER_ACCEPT")
    with pytest.raises(OSError, match="TCP_DEFER_ACCEPT") as info:
        ListenConfig(defer_accept=5)
    assert info.value.errno == errno.ENOPROTOOPT


def test_valid_values_are_normalised():
    cfg = ListenConfig(host="::1", backlog=-3, family="ipv6")
    assert cfg.family == socket.AF_INET6 and cfg.backlog == 0
    # no host: loopback only (the safe default); '' every interface
    assert ListenConfig().family == socket.AF_INET and ListenConfig().bind_host == "127.0.0.1"
    assert ListenConfig(host="").bind_host == "0.0.0.0"
    assert ListenConfig(family="ipv6").bind_host == "::1"
    assert ListenConfig(host="", family="ipv6").bind_host == "::"
    assert ListenConfig(dualstack=True).bind_host == "::"
    assert ListenConfig.from_address(("127.0.0.1", 80)).address == ("127.0.0.1", 80)
    assert ListenConfig.from_address("/tmp/x.sock").family == socket.AF_UNIX
    assert ListenConfig(host="localhost").family == socket.AF_INET
    cfg = ListenConfig(port=80, nodelay=True)
    assert cfg.replace(port=81).port == 81 and cfg.replace(port=81).nodelay
    with pytest.raises(OverflowError):
        cfg.replace(port=70000)


def test_options_apply_to_a_plain_socket_and_a_raw_descriptor():
    cfg = ListenConfig(host="127.0.0.1", rcvbuf=32768, nodelay=True)
    with socket.socket() as s:
        cfg.apply_listener_options(s)
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 32768
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    with socket.socket() as s:
        cfg.apply_listener_options(s.fileno())
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        cfg.apply_connection_options(s)      # harmless either way


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:4481", dict(host="127.0.0.1", port=4481)),
    ("[::1]:7", dict(host="::1", port=7)),
    (":8000", dict(host="", port=8000)),
    ("8000", dict(port=8000)),               # no host: loopback, as port= alone
    ("localhost:0", dict(host="localhost", port=0)),
    ("unix:rel.sock", dict(path="rel.sock")),
    ("/run/app.sock", dict(path="/run/app.sock")),
])
def test_parse_bind(text, expected):
    assert parse_bind(text) == expected


@pytest.mark.parametrize("text, message", [
    ("::1:80", r"\[address\]:port"), ("[::1]80", r"\[address\]:port"),
    ("[::1", r"\[address\]:port"), ("host:http", "must be a number"),
    ("host:", "must be a number"), ("", "no port given"),
    ("127.0.0.1", "no port given"), ("app.sock", r"\./app\.sock or unix:app\.sock"),
])
def test_parse_bind_rejects_malformed_addresses(text, message):
    with pytest.raises(ValueError, match=message):
        parse_bind(text)


def test_from_args_refuses_bind_with_fd():
    import argparse
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = from_args(parser.parse_args(["--bind", "[::1]:0", "--nodelay"]))
    assert cfg.host == "::1" and cfg.nodelay
    with pytest.raises(ValueError, match="not both"):
        from_args(parser.parse_args(["--bind", ":80", "--fd", "3"]))
    with pytest.raises(ValueError, match="--fd"):
        from_args(parser.parse_args(["--fd", "three"]))


def test_systemd_fds_only_for_this_process(monkeypatch):
    import os
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "2")
    assert systemd_fds(unset_environment=False) == [3, 4]
    assert systemd_fds() == [3, 4] and "LISTEN_FDS" not in os.environ
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "2")
    assert systemd_fds() == []


# -- fuzzing: anything at all for each option -------------------------------------

JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
    st.integers(min_value=-3, max_value=70000), st.floats(allow_nan=True),
    st.text(max_size=12), st.binary(max_size=12), st.lists(st.integers(), max_size=2),
    st.sampled_from(["systemd", "ipv4", "ipv6", "unix", "::", "127.0.0.1", "0o600"]),
)
# port is fuzzed without binding: a random fixed port might belong to someone else
OPENED = ["family", "dualstack", "backlog", "reuse_address", "reuse_port", "nodelay",
          "keepalive", "rcvbuf", "sndbuf", "defer_accept", "fastopen", "unix_mode",
          "unlink_stale"]
EXPECTED = (TypeError, ValueError, OverflowError, OSError)


def _as_kept(name, value):
    """What ListenConfig keeps of a value it accepts: family names become
    AddressFamily members (None: the address's, here IPv4), a negative
    backlog clamps to 0; the rest is kept as given."""
    if name == "family":
        return {None: socket.AF_INET, "ipv4": socket.AF_INET, "ipv6": socket.AF_INET6,
                "unix": socket.AF_UNIX}.get(value, value)
    if name == "backlog" and value is not None and value < 0:
        return 0
    return value


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(OPENED), value=JUNK)
def test_fuzzed_options_give_a_listener_or_a_clear_error(name, value):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            lst = fastlisten.listen(("127.0.0.1", 0), **{name: value})
        except EXPECTED as exc:
            assert name in str(exc), f"{exc!r} does not name {name}"
        else:
            with lst:
                assert getattr(lst.config, name) == _as_kept(name, value)
    assert all(issubclass(w.category, FastlistenWarning) for w in caught), caught


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["host", "port", "path", "fd", "family"]), value=JUNK)
def test_fuzzed_addresses_give_a_config_or_a_clear_error(name, value):
    try:
        config = ListenConfig(**{name: value})
    except EXPECTED as exc:
        assert name in str(exc), f"{exc!r} does not name {name}"
    else:
        assert getattr(config, name) == _as_kept(name, value)


def test_proxy_settings_resolved_with_defaults():
    assert ListenConfig().proxy() is None
    p = ListenConfig(proxy_protocol="v1+v2").proxy()
    assert (p.versions, p.timeout, p.max_v2) == (3, 3.0, 2048)
    assert p.trusts(("127.8.9.10", 1)) and p.trusts(("::1", 1, 0, 0))
    assert p.trusts(("::ffff:127.0.0.1", 1, 0, 0))      # dualstack: mapped IPv4
    assert p.trusts("") and p.trusts("/run/peer.sock")  # Unix socket peers are local
    assert not p.trusts(("10.0.0.1", 1)) and not p.trusts(("::2", 1, 0, 0))
    cfg = ListenConfig(proxy_protocol="v2", trusted_proxies=" 10.0.0.0/8, 192.0.2.7",
                       proxy_timeout=5, proxy_max_v2=4096)
    assert cfg.trusted_proxies == ("10.0.0.0/8", "192.0.2.7/32")
    p = cfg.proxy()
    assert (p.versions, p.timeout, p.max_v2) == (2, 5.0, 4096)
    assert p.trusts(("10.9.9.9", 1)) and p.trusts(("192.0.2.7", 1))
    assert not p.trusts(("127.0.0.1", 1)) and not p.trusts(("192.0.2.8", 1))
    assert cfg.replace(proxy_protocol="v1").proxy().versions == 1


def test_a_bare_listener_refuses_proxy_protocol():
    with pytest.raises(ValueError, match="server classes"):
        fastlisten.listen(("127.0.0.1", 0), proxy_protocol="v1")


def test_tls_settings_resolved_and_refused_by_a_bare_listener():
    """TLS lives in the config (where no socketserver subclass keeps
    anything of its own): tls() fills in the default handshake timeout; a
    Listener, which hands over raw connections, refuses it; socket_only()
    is what the listening socket itself takes."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert ListenConfig().tls() is None
    cfg = ListenConfig(ssl_context=context)
    assert cfg.tls() == (context, 10.0)
    assert cfg.replace(handshake_timeout=2.5).tls().handshake_timeout == 2.5
    assert cfg.replace(ssl_context=None).tls() is None
    with pytest.raises(ValueError, match="server classes"):
        fastlisten.listen(("127.0.0.1", 0), ssl_context=context)
    both = ListenConfig(nodelay=True, proxy_protocol="v2", ssl_context=context,
                        handshake_timeout=3)
    assert both.socket_only() == ListenConfig(nodelay=True)


def test_proxy_and_tls_flags_are_generated():
    import argparse
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = from_args(parser.parse_args([
        "--bind", "127.0.0.1:0", "--proxy-protocol", "v1+v2",
        "--trusted-proxy", "10.0.0.0/8,127.0.0.1", "--proxy-timeout", "4.5",
        "--proxy-max-v2", "1024"]))
    assert cfg.proxy_protocol == "v1+v2"
    assert cfg.trusted_proxies == ("10.0.0.0/8", "127.0.0.1/32")
    assert cfg.proxy_timeout == 4.5 and cfg.proxy_max_v2 == 1024
    with pytest.raises(SystemExit):
        parser.parse_args(["--proxy-protocol", "v9"])


def test_the_accept_filter_settings_resolve_with_their_defaults():
    assert ListenConfig().ready() is None
    ready = ListenConfig(ready_rule="http").ready()
    assert ready == ("http", 10.0, 16384, None, 0, 2048, 0)
    ready = ListenConfig(ready_rule="line", ready_timeout=2, ready_max_bytes=64, max_waiting=5,
                         proxy_protocol="v1+v2", proxy_max_v2=4096, ready_min_rate=500).ready()
    assert ready == ("line", 2.0, 64, 5, 3, 4096, 500)


def test_the_accept_filter_has_command_line_flags():
    import argparse
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = from_args(parser.parse_args(["--ready-rule", "line", "--ready-timeout", "2.5",
                                       "--ready-max-bytes", "64", "--max-waiting", "5"]))
    assert cfg.ready()[:6] == ("line", 2.5, 64, 5, 0, 2048)
    assert from_args(parser.parse_args([])).ready() is None
