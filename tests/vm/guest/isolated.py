"""What the guest can reach: only the gateway, through qemu's forward."""
import socket


def reach(host, port):
    try:
        socket.create_connection((host, port), timeout=2).close()
        return "open"
    except OSError:
        return "closed"


print(
    " ".join(
        f"{h}:{p}={reach(h, p)}"
        for h, p in [("10.0.2.100", 4143), ("10.0.2.2", 8080), ("10.0.2.2", 4143), ("10.0.2.2", 22), ("1.1.1.1", 443)]
    )
)
