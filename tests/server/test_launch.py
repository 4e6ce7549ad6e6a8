"""The listening socket `dspark serve` binds."""

import socket

from server.launch import bind_socket


def test_accepted_connections_send_small_writes_at_once():
    """TCP_NODELAY on the listening socket reaches every accepted connection: without it, a
    response body (or an SSE chunk) after a small first write on a kept-alive connection
    waited for the client's delayed ACK, 40 ms per request."""
    server = bind_socket("127.0.0.1", 0)
    server.listen(1)
    try:
        with socket.create_connection(server.getsockname()):
            conn, _ = server.accept()
            with conn:
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        server.close()
