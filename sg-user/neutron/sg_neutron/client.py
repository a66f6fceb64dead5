"""The client side of the sg agent's local API (PROTOCOL.md): newline-delimited JSON over a
Unix stream socket, one request per driver call, answered in order."""

import itertools
import json
import socket
import threading

PROTOCOL_VERSION = 1


class AgentUnreachable(Exception):
    """The sg agent could not be reached, or the connection broke.

    Neutron's agent treats an exception from its firewall driver as a failed sync and
    schedules a full resync, which repeats the calls once the sg agent is back.
    """


class ConnectionLost(AgentUnreachable):
    """The connection closed under a request: the agent exited (or restarted) since it was
    opened."""


class AgentError(Exception):
    """The sg agent answered with an error: ``kind`` is ``invalid`` (the call's content broke
    a Neutron rule; nothing changed), ``apply``, ``persist``, ``not_enforced``, ``protocol``,
    ``version`` or ``denied``. ``errors`` holds, for ``invalid``, one dict per problem with
    ``object``, ``id``, ``field``, ``value`` and ``reason``."""

    def __init__(self, op, kind, message, errors=None):
        self.op = op
        self.kind = kind
        self.errors = errors or []
        super().__init__('sg agent refused %s (%s): %s' % (op, kind, message))


def _jsonable(obj):
    # Neutron hands sets of (ip, mac) tuples and netaddr objects to its drivers.
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=lambda x: json.dumps(x, default=str))
    if isinstance(obj, tuple):
        return list(obj)
    return str(obj)


class AgentClient:
    """One connection to the agent, opened on first use and re-opened after a failure.

    ``on_connect`` is called with the client after each (re)connection, before the request
    that needed it (the driver says hello there).
    """

    def __init__(self, path, timeout=60.0, on_connect=None):
        self.path = path
        self.timeout = timeout
        self.on_connect = on_connect
        self._sock = None
        self._rfile = None
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        # Bumped at every new connection: a deferred batch lives on one connection.
        self.connection_number = 0

    def close(self):
        with self._lock:
            if self._rfile is not None:
                self._rfile.close()
            if self._sock is not None:
                self._sock.close()
            self._sock = self._rfile = None

    def _connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except OSError as e:
            s.close()
            raise AgentUnreachable(
                'sg agent unreachable at %s: %s (is `sg agent --api-socket %s` '
                'running, and may this user connect?)' % (self.path, e, self.path))
        self._sock = s
        self._rfile = s.makefile('rb')
        self.connection_number += 1
        if self.on_connect is not None:
            try:
                self.on_connect(self)
            except Exception:
                self.close()
                raise

    @property
    def connected(self):
        return self._sock is not None

    def call(self, op, wait_s=None, reconnect=True, **args):
        """Sends one request and returns the agent's answer (a dict) or raises. Without
        ``reconnect``, a closed connection raises instead of being re-opened (a deferred
        batch lives on its connection)."""
        with self._lock:
            opened_before = self._sock is not None
            if self._sock is None:
                if not reconnect:
                    raise AgentUnreachable(
                        'the connection to the sg agent at %s broke during a '
                        'batch of calls: the batch was not applied' % self.path)
                self._connect()
            try:
                return self._call_locked(op, wait_s, args)
            except ConnectionLost:
                # A connection opened by an earlier call outlived its agent (restarted by
                # the operator or systemd). Raising would lose the call: Neutron's agent
                # resyncs after a failed port call, but not after one made from its
                # security-group callbacks (security_group_updated for a rule change),
                # which it only logs. Every request sets state (the agent resumes from its
                # saved copy), so sending it once more to the new agent is safe. A call
                # inside a batch is not retried: the batch died with its connection.
                if not (opened_before and reconnect):
                    raise
                self._connect()
                return self._call_locked(op, wait_s, args)

    def _call_locked(self, op, wait_s, args):
        req = {'v': PROTOCOL_VERSION, 'id': next(self._ids), 'op': op}
        req.update(args)
        if wait_s is not None:
            req['wait_ms'] = int(wait_s * 1000)
            # The answer may come only after the wait.
            self._sock.settimeout(self.timeout + wait_s)
        line = json.dumps(req, default=_jsonable, separators=(',', ':'))
        try:
            self._sock.sendall(line.encode() + b'\n')
            answer = self._rfile.readline()
        except (BrokenPipeError, ConnectionResetError) as e:
            self.close()
            raise ConnectionLost('sg agent at %s: %s failed: %s'
                                 % (self.path, op, e))
        except OSError as e:
            self.close()
            raise AgentUnreachable('sg agent at %s: %s failed: %s'
                                   % (self.path, op, e))
        finally:
            if self._sock is not None:
                self._sock.settimeout(self.timeout)
        if not answer:
            self.close()
            raise ConnectionLost('sg agent at %s closed the connection '
                                   'during %s' % (self.path, op))
        try:
            resp = json.loads(answer)
        except ValueError as e:
            self.close()
            raise AgentUnreachable('sg agent at %s answered %s with something '
                                   'that is not JSON: %s' % (self.path, op, e))
        if resp.get('id') not in (None, req['id']):
            self.close()
            raise AgentUnreachable('sg agent at %s answered another request '
                                   '(%r for %r)' % (self.path, resp.get('id'),
                                                    req['id']))
        if not resp.get('ok'):
            err = resp.get('error') or {}
            raise AgentError(op, err.get('kind', '?'), err.get('message', ''),
                             err.get('errors'))
        return resp
