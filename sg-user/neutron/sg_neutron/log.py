"""Security-group logging (Neutron's network log API) through the sg agent.

Neutron's L2 agent loads its ``log`` extension's driver by the agent's type: ``ovs`` for
neutron-openvswitch-agent, which names Neutron's own OVS-firewall log driver (it writes
OpenFlow rules of the OVS firewall, which a node running ``sg``/``sg_hybrid`` does not have).
Such a node enables ``[agent] extensions = sg_log`` instead: :class:`SgLoggingExtension` is
Neutron's ``LoggingExtension`` (the same RPC consumers, notifications and port hooks) with
:class:`SgLoggingDriver`.

The driver hands the agent each log object (``update_log``, ``delete_log``; PROTOCOL.md), and
the agent logs the ports an object covers, in the OVS driver's line format
(``sg agent --log-output``, ``--log-rate-limit``, ``--log-burst-limit``: Neutron's
``[network_log]`` options):

- A notification (an object created, updated or deleted) carries the object itself, with
  its group and target: the agent works out which of its ports it covers.
- A port coming up makes the extension ask the server which objects cover that port
  (``get_sg_log_info_for_port``). The answer names the covered ports, not the object's group
  and target, so the driver pushes the object with ``port_ids``, the ports learnt so far,
  unless the agent already holds the object itself.
"""

import contextlib
import logging

try:  # Inside a Neutron agent: its base classes.
    from neutron.services.logapi.agent import log_extension as _log_ext
    _DriverBase = _log_ext.LoggingDriver
    _ExtensionBase = _log_ext.LoggingExtension
except ImportError:  # pragma: no cover - only without Neutron
    class _DriverBase:
        def defer_apply_on(self):
            pass

        def defer_apply_off(self):
            pass

        @contextlib.contextmanager
        def defer_apply(self):
            self.defer_apply_on()
            try:
                yield
            finally:
                self.defer_apply_off()

    _ExtensionBase = object

from sg_neutron import driver as _driver
from sg_neutron.client import AgentClient

LOG = logging.getLogger(__name__)

SECURITY_GROUP = 'security_group'
_FIELDS = ('id', 'name', 'project_id', 'resource_type', 'resource_id', 'target_id',
           'event', 'enabled')


def _get(obj, key):
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


def log_object(log):
    """A log object (Neutron's ``Log`` versioned object or a dict) as the API's JSON."""
    out = {}
    for key in _FIELDS:
        value = _get(log, key)
        if value is None:
            continue
        out[key] = value if isinstance(value, bool) else str(value)
    out.setdefault('resource_type', SECURITY_GROUP)
    return out


class SgLoggingDriver(_DriverBase):
    """Log objects to the sg agent. Only security-group logging."""

    SUPPORTED_LOGGING_TYPES = (SECURITY_GROUP,)

    def __init__(self, agent_api=None, api_socket=None, request_timeout=None):
        path, req_timeout, _ = _driver._config()
        self.api_socket = api_socket or path
        self._client = AgentClient(
            self.api_socket,
            timeout=req_timeout if request_timeout is None else request_timeout)
        self.resource_rpc = None
        # Log ids the agent holds as whole objects (with group and target); None until the
        # agent's state has been read.
        self._whole = None
        # Log id -> the ports learnt for it from ports coming up.
        self._learnt = {}

    def initialize(self, resource_rpc, **kwargs):
        self.resource_rpc = resource_rpc

    def _whole_ids(self):
        if self._whole is None:
            state = self._client.call('state')
            logs = (state.get('document') or {}).get('logs') or []
            self._whole = {l['id'] for l in logs if 'port_ids' not in l}
        return self._whole

    def start_logging(self, context, **kwargs):
        for log in kwargs.get('log_resources') or []:
            if _get(log, 'resource_type') not in (None, SECURITY_GROUP):
                continue
            obj = log_object(log)
            self._client.call('update_log', log=obj)
            self._whole_ids().add(obj['id'])
            self._learnt.pop(obj['id'], None)
        port_id = kwargs.get('port_id')
        if port_id and self.resource_rpc is not None:
            infos = self.resource_rpc.get_sg_log_info_for_port(
                context, resource_type=SECURITY_GROUP, port_id=port_id)
            for info in infos or []:
                log_id = info['id']
                if log_id in self._whole_ids():
                    continue
                ports = self._learnt.setdefault(log_id, set())
                ports.update(p['port_id'] for p in info.get('ports_log') or [])
                self._client.call('update_log', log={
                    'id': log_id,
                    'project_id': info.get('project_id') or '',
                    'resource_type': SECURITY_GROUP,
                    'event': info.get('event') or 'ALL',
                    'enabled': True,
                    'port_ids': sorted(ports),
                })

    def stop_logging(self, context, **kwargs):
        # A port that goes leaves the agent's input, and an object covers only the input's
        # ports: nothing to do for ``port_id``.
        for log in kwargs.get('log_resources') or []:
            obj = log_object(log)
            self._learnt.pop(obj['id'], None)
            if obj.get('enabled') is False:
                # An update that disabled the object: it stays, logging nothing.
                self._client.call('update_log', log=obj)
                self._whole_ids().add(obj['id'])
            else:
                self._client.call('delete_log', log_id=obj['id'])
                self._whole_ids().discard(obj['id'])


class SgLoggingExtension(_ExtensionBase):
    """``[agent] extensions = sg_log``: Neutron's log extension driving :class:`SgLoggingDriver`
    whatever the agent's type."""

    def initialize(self, connection, driver_type):
        from neutron.services.logapi.rpc import agent as agent_rpc
        self.log_driver = SgLoggingDriver(getattr(self, 'agent_api', None))
        self.resource_rpc = agent_rpc.LoggingApiStub()
        self._register_rpc_consumers(connection)
        self.log_driver.initialize(self.resource_rpc)
        LOG.info('sg: security-group logging through the sg agent at %s',
                 self.log_driver.api_socket)
