"""Loopback stand-ins for the network: a free port, and a URL where nothing listens."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port_url(path: str = "") -> str:
    """An http URL on loopback where nothing listens (simulates being offline)."""
    return f"http://127.0.0.1:{free_port()}/{path}"
