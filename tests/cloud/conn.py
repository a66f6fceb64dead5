"""A long-lived TCP connection for the restart check: connects to HOST PORT, then for each line
on stdin sends it and prints `ok` when the echo server returns it, `fail: <why>` otherwise."""

import socket
import sys

host, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, port), timeout=5)
print("connected", flush=True)
for line in sys.stdin:
    try:
        s.settimeout(3)
        s.sendall(line.encode())
        got = b""
        while not got.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("closed by peer")
            got += chunk
        print("ok" if got.decode() == line else f"fail: echoed {got!r}", flush=True)
    except OSError as e:
        print(f"fail: {e}", flush=True)
