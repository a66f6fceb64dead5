"""Runs inside a VM's namespace and answers TCP reachability questions from stdin, one per
line: `HOST PORT TIMEOUT_MS` -> `allowed` (the handshake completed or the peer reset it: the
SYN went through the firewall) or `blocked` (no answer within the timeout). Each question is a
new connection from a new source port, so conntrack never carries an old verdict over."""

import errno
import socket
import sys

for line in sys.stdin:
    host, port, timeout_ms = line.split()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(int(timeout_ms) / 1000)
    try:
        s.connect((host, int(port)))
        verdict = "allowed"
    except ConnectionRefusedError:
        verdict = "allowed"
    except (TimeoutError, socket.timeout):
        verdict = "blocked"
    except OSError as e:
        verdict = f"error {errno.errorcode.get(e.errno, e.errno)}"
    finally:
        # RST instead of FIN: no TIME_WAIT, no lingering conntrack entry on the VM's side.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
    print(verdict, flush=True)
