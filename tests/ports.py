"""A free TCP port for the rendezvous of multi-process tests."""

import socket


def free_port() -> int:
    """A port the OS reports free now. Each test asks for its own, rather than deriving one from
    its process id, which two tests of one pytest process could share."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
