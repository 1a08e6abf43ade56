import socket
import fastlisten

def test_listen_accept():
    with fastlisten.listen(("127.0.0.1", 0)) as lst:
        with socket.create_connection(lst.address) as c:
            conn, addr = lst.accept(timeout=5)
            with conn:
                assert addr == c.getsockname()
