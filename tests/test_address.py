"""One set of address rules and messages, wherever an address comes in:
fastlisten.listen / ListenConfig, Listener.bind, both cores, the command
line and the socketserver classes."""

import errno
import os
import re
import socket
import socketserver

import pytest

import fastlisten
from fastlisten import address
from fastlisten._corepy import RawListener as PyRaw
from fastlisten.config import ListenConfig

try:
    from fastlisten._core import RawListener as CRaw
except ImportError:     # pragma: no cover - the pure-Python install
    CRaw = None

CORES = [pytest.param(PyRaw, id="pure")] + (
    [pytest.param(CRaw, id="compiled")] if CRaw is not None else
    [pytest.param(None, id="compiled", marks=pytest.mark.skip(reason="extension not built"))])


def _message(fn, *args, **kwargs):
    with pytest.raises(Exception) as info:
        fn(*args, **kwargs)
    return type(info.value), str(info.value)


@pytest.mark.parametrize("port", [True, False])
def test_a_bool_port_is_refused_everywhere_with_one_message(port):
    expected = (TypeError, f"port must be an integer 0-65535, not bool: {port!r}")
    assert _message(address.check_port, port) == expected
    assert _message(ListenConfig, host="127.0.0.1", port=port) == expected
    assert _message(fastlisten.listen, ("127.0.0.1", port)) == expected
    with fastlisten.Listener() as lst:
        assert _message(lst.bind, ("127.0.0.1", port)) == expected


@pytest.mark.parametrize("raw_class", CORES)
def test_the_cores_check_ports_with_the_same_words(raw_class):
    raw = raw_class(socket.AF_INET)
    try:
        assert _message(raw.bind, ("127.0.0.1", True)) == _message(address.check_port, True)
        assert _message(raw.bind, ("127.0.0.1", 70000)) == _message(address.check_port, 70000)
        assert _message(raw.bind, ("127.0.0.1", "80")) == _message(address.check_port, "80")
    finally:
        raw.close()


@pytest.mark.parametrize("raw_class", CORES)
def test_unix_path_limit_is_108_bytes_everywhere(raw_class, tmp_path):
    too_long = "/" + "x" * 108                         # 109 bytes
    abstract = b"\0" + b"a" * 107                      # exactly 108: allowed
    kind, text = _message(address.unix_path, too_long)
    assert kind is OSError and "the limit is 108" in text
    for attempt in (lambda: ListenConfig(path=too_long), lambda: fastlisten.listen(too_long)):
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EINVAL and "the limit is 108" in str(info.value)
    raw = raw_class(socket.AF_UNIX)
    try:
        with pytest.raises(OSError, match="the limit is 108"):
            raw.bind(too_long)
        raw.bind(abstract)
        assert raw.getsockname() == abstract
    finally:
        raw.close()


class _BytesPath:
    def __fspath__(self):
        return b"nul.sock\0junk"


@pytest.mark.parametrize("bad", [b"nul.sock\0junk", bytearray(b"nul.sock\0junk"),
                                 memoryview(b"nul.sock\0junk"), "nul.sock\0junk",
                                 _BytesPath()])
def test_a_unix_path_with_a_nul_is_refused_before_anything_is_bound(bad, tmp_path,
                                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    with fastlisten.Listener(socket.AF_UNIX) as lst:
        with pytest.raises(ValueError, match="embedded null byte"):
            lst.bind(bad)
        lst.bind(b"ok.sock")      # the listener was left unbound: this works
    assert os.listdir(tmp_path) == []     # close() removed ok.sock; nul.sock never existed


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_bytes_like_unix_paths_are_bound_and_removed_on_close(kind, tmp_path):
    path = os.fsencode(tmp_path / "bl.sock")
    with fastlisten.Listener(socket.AF_UNIX) as lst:
        lst.bind(kind(path))
        assert lst.address == os.fsdecode(path)
    assert not os.path.exists(path)


def test_a_host_port_string_is_tcp_never_a_socket_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with fastlisten.listen("127.0.0.1:0") as lst:
        assert lst.family == socket.AF_INET and lst.address[0] == "127.0.0.1"
    with fastlisten.listen("localhost:0") as lst:
        assert lst.family == socket.AF_INET
    with pytest.raises(ValueError, match="no port given"):
        fastlisten.listen("app.sock")
    assert os.listdir(tmp_path) == []
    with fastlisten.listen("./app.sock") as lst:       # a / makes it a path
        assert lst.family == socket.AF_UNIX
    with fastlisten.listen("unix:app2.sock") as lst:
        assert lst.family == socket.AF_UNIX and lst.address.endswith("app2.sock")
    with fastlisten.listen("plain.sock", family="unix") as lst:   # family says so
        assert lst.family == socket.AF_UNIX


def test_unix_prefix_is_stripped_also_when_the_family_says_unix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with fastlisten.listen("unix:u.sock", family="unix") as lst:
        assert lst.address == "u.sock"
    assert ListenConfig.from_address("unix:u.sock", family="unix").path == "u.sock"
    assert os.listdir(tmp_path) == []


class _Handler(socketserver.BaseRequestHandler):
    pass


class _Configured(fastlisten.TCPServer):
    listen_config = ListenConfig()


@pytest.mark.parametrize("cls", [fastlisten.TCPServer, _Configured, fastlisten.UDPServer,
                                 fastlisten.ThreadingTCPServer])
@pytest.mark.parametrize("text", ["localhost:0", "app.sock", "unix:app.sock"])
def test_a_tcp_server_refuses_a_string_address_with_or_without_listen_config(
        cls, text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TypeError, match=r"must be a \(host, port\) tuple, not str: "
                                        + re.escape(repr(text))):
        cls(text, _Handler)
    assert os.listdir(tmp_path) == []


class _UnixConfigured(fastlisten.UnixStreamServer):
    listen_config = ListenConfig(family="unix")


@pytest.mark.parametrize("cls", [fastlisten.UnixStreamServer, _UnixConfigured])
def test_a_unix_server_takes_its_path_as_written_like_the_stdlib(cls, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # socketserver.UnixStreamServer binds any str as a path: so do these,
    # listen_config or not (no text notation for a server_address)
    with cls("unix:literal.sock", _Handler) as server:
        assert server.server_address == "unix:literal.sock"
        assert os.listdir(tmp_path) == ["unix:literal.sock"]


def test_no_host_means_loopback_and_empty_host_every_interface():
    with fastlisten.listen() as lst:
        assert lst.address[0] == "127.0.0.1"
    with fastlisten.listen(port=0, host="") as lst:
        assert lst.address[0] == "0.0.0.0"
    with fastlisten.listen(":0") as lst:
        assert lst.address[0] == "0.0.0.0"


def test_the_command_line_and_the_library_read_a_string_alike():
    for text in ("127.0.0.1:4481", "[::1]:7", ":80", "unix:/run/x.sock", "/run/x.sock"):
        assert ListenConfig.from_address(text) == ListenConfig(**address.parse(text))


def test_an_inet_address_with_too_many_items_is_a_type_error():
    with fastlisten.Listener(socket.AF_INET) as lst:
        with pytest.raises(TypeError, match=r"\(host, port\)"):
            lst.bind(("127.0.0.1", 0, 0))


# -- bind errors, explained for the caller that met them -----------------------

def _stale_socket_file(path):
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()            # a leftover file, as a crashed server leaves it


def test_a_stale_socket_file_is_explained_for_each_caller(tmp_path):
    path = str(tmp_path / "stale.sock")
    _stale_socket_file(path)
    # a server class without listen_config never removes it (as the stdlib)
    with pytest.raises(OSError, match="give the server class listen_config") as info:
        fastlisten.UnixStreamServer(path, _Handler)
    assert info.value.errno == errno.EADDRINUSE and "unlink_stale=True" in str(info.value)
    with pytest.raises(OSError, match=r"unlink_stale=False leaves it in place") as info:
        fastlisten.listen(path, unlink_stale=False)
    assert info.value.errno == errno.EADDRINUSE
    with fastlisten.Listener(socket.AF_UNIX) as lst:
        with pytest.raises(OSError, match=r"bind with fastlisten\.listen\(\)"):
            lst.bind(path)
    with fastlisten.listen(path) as lst:     # unlink_stale=True, the default
        assert lst.address == path


@pytest.mark.parametrize("make", [
    lambda p: fastlisten.listen(p),
    lambda p: fastlisten.UnixStreamServer(p, _Handler),
], ids=["listen", "UnixStreamServer"])
def test_a_unix_path_in_a_missing_directory_names_it(make, tmp_path):
    path = str(tmp_path / "missing-dir" / "x.sock")
    with pytest.raises(FileNotFoundError, match=f"directory {re.escape(str(tmp_path))}"
                                                f"/missing-dir does not exist") as info:
        make(path)
    assert info.value.errno == errno.ENOENT
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="file is not a directory"):
        make(str(tmp_path / "file" / "x.sock"))


def test_a_server_names_a_host_that_does_not_resolve_as_listen_does():
    # a name glibc refuses without asking DNS (no traffic leaves the machine)
    host = "no such host.invalid"
    with pytest.raises(socket.gaierror, match=f"no IPv4 address for host '{host}'"):
        fastlisten.listen((host, 8080))
    with pytest.raises(socket.gaierror, match=f"no IPv4 address for host '{host}'"):
        fastlisten.TCPServer((host, 8080), _Handler)
