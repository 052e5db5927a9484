"""qemu's guestfwd runs this once per guest connection, on stdin/stdout:
it copies bytes to and from HOST:PORT (the gateway on a loopback address
the guest cannot name itself)."""
import os
import socket
import sys
import threading

sock = socket.create_connection((sys.argv[1], int(sys.argv[2])))


def up():
    while True:
        data = os.read(0, 65536)
        if not data:
            sock.shutdown(socket.SHUT_WR)
            return
        sock.sendall(data)


threading.Thread(target=up, daemon=True).start()
while True:
    data = sock.recv(65536)
    if not data:
        break
    os.write(1, data)
