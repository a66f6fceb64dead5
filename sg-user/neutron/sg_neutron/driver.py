"""Neutron firewall drivers backed by the sg agent.

Thin on purpose: each method of Neutron's ``FirewallDriver`` becomes one request to the
agent's socket (PROTOCOL.md), carrying the call's arguments as Neutron passed them. The agent
converts Neutron's RPC shapes, validates them with the model's rules, compiles and applies.
Every failure raises, so that Neutron's agent schedules its usual resync.

``prepare_port_filter`` returns only once the agent enforces the port's tap (or raises after
``[sg] enforce_timeout``): the OVS agent keeps a new port on its dead VLAN until its driver
returns, so the VM's first frame already meets its security groups.
"""

import logging

try:  # Inside a Neutron agent: its base class, so that isinstance checks hold.
    from neutron.agent import firewall as _neutron_firewall
    _Base = _neutron_firewall.FirewallDriver
except ImportError:  # pragma: no cover - only without Neutron (the unit tests' fallback)
    import contextlib

    class _Base:
        @contextlib.contextmanager
        def defer_apply(self):
            self.filter_defer_apply_on()
            try:
                yield
            finally:
                self.filter_defer_apply_off()

from sg_neutron.client import AgentClient, AgentUnreachable

LOG = logging.getLogger(__name__)

DEFAULT_SOCKET = '/run/sg/agent.sock'
DEFAULT_REQUEST_TIMEOUT = 60.0
DEFAULT_ENFORCE_TIMEOUT = 10.0


def _register_opts():
    """``[sg] api_socket``, ``request_timeout`` and ``enforce_timeout`` in the agent's
    configuration files, when oslo.config is there (it is in every Neutron agent)."""
    try:
        from oslo_config import cfg
    except ImportError:
        return None
    opts = [
        cfg.StrOpt('api_socket', default=DEFAULT_SOCKET,
                   help='Unix socket of the sg agent (sg agent --api-socket).'),
        cfg.FloatOpt('request_timeout', default=DEFAULT_REQUEST_TIMEOUT,
                     help='Seconds to wait for the sg agent to answer a call.'),
        cfg.FloatOpt('enforce_timeout', default=DEFAULT_ENFORCE_TIMEOUT,
                     help="Seconds prepare_port_filter waits for the port's tap "
                          "to be enforced before raising."),
    ]
    try:
        cfg.CONF.register_opts(opts, group='sg')
    except cfg.DuplicateOptError:
        pass
    return cfg


_cfg = _register_opts()


def _config():
    if _cfg is not None:
        try:
            c = _cfg.CONF.sg
            return c.api_socket, c.request_timeout, c.enforce_timeout
        except _cfg.Error:  # the configuration files are not parsed (a bare import)
            pass
    return DEFAULT_SOCKET, DEFAULT_REQUEST_TIMEOUT, DEFAULT_ENFORCE_TIMEOUT


class SgFirewallDriver(_Base):
    """``firewall_driver = sg``: the port dict's ``device`` is the tap."""

    PLUG = 'direct'

    def __init__(self, integration_bridge=None, api_socket=None,
                 request_timeout=None, enforce_timeout=None):
        # integration_bridge: the OVS agent passes it to every driver; sg does not use OVS.
        path, req_timeout, enf_timeout = _config()
        self.api_socket = api_socket or path
        self.enforce_timeout = (enforce_timeout if enforce_timeout is not None
                                else enf_timeout)
        self._client = AgentClient(
            self.api_socket,
            timeout=(request_timeout if request_timeout is not None
                     else req_timeout),
            on_connect=self._hello)
        # device -> port dict, as Neutron's drivers keep them (its agent reads `ports`).
        self._ports = {}
        self._deferred = False
        # The connection a batch began on (if it breaks, the agent dropped the batch), and
        # the ports as they were before it.
        self._batch_connection = None
        self._ports_before = None

    # -- the connection ---------------------------------------------------------------

    def _hello(self, client):
        client._call_locked('hello', None, {'plug': self.PLUG,
                                            'client': 'sg_neutron %s' % type(self).__name__})

    def _call(self, op, wait=False, **args):
        # Inside a batch, the calls must reach the connection that holds it.
        try:
            return self._client.call(op, wait_s=self.enforce_timeout if wait else None,
                                     reconnect=not self._deferred, **args)
        except AgentUnreachable:
            self._batch_lost()
            raise

    def _batch_lost(self):
        # What the batch recorded was never applied.
        if self._deferred or self._ports_before is not None:
            self._ports = self._ports_before or {}
            self._ports_before = None

    # -- FirewallDriver ---------------------------------------------------------------

    @property
    def ports(self):
        return dict(self._ports)

    def prepare_port_filter(self, port):
        LOG.debug('sg: preparing filter for %s', port['device'])
        # Outside a batch, the answer comes once the tap is enforced; inside, at the end of
        # the batch (filter_defer_apply_off).
        self._call('prepare_port_filter', wait=not self._deferred, port=port)
        self._ports[port['device']] = port

    def apply_port_filter(self, port):
        # prepare_port_filter already returned with the port enforced.
        pass

    def update_port_filter(self, port):
        if port['device'] not in self._ports:
            LOG.info('Attempted to update port filter which is not filtered %s',
                     port['device'])
            return
        self._call('update_port_filter', wait=not self._deferred, port=port)
        self._ports[port['device']] = port

    def remove_port_filter(self, port):
        if port['device'] not in self._ports:
            LOG.info('Attempted to remove port filter which is not filtered %r',
                     port['device'])
            return
        self._call('remove_port_filter', port=port)
        self._ports.pop(port['device'], None)

    def update_security_group_rules(self, sg_id, rules):
        self._call('update_security_group_rules', sg_id=sg_id, rules=rules)

    def update_security_group_members(self, sg_id, ips):
        self._call('update_security_group_members', sg_id=sg_id, members=ips)

    def security_group_updated(self, action_type, sec_group_ids,
                               device_ids=None):
        # sg re-checks every flow whose admitting rule changed on its own; the agent only
        # records the call.
        self._call('security_group_updated', action_type=action_type,
                   sec_group_ids=list(sec_group_ids or []),
                   device_ids=list(device_ids or []))

    def process_trusted_ports(self, port_ids):
        if port_ids:
            self._call('process_trusted_ports', port_ids=list(port_ids))

    def remove_trusted_ports(self, port_ids):
        if port_ids:
            self._call('remove_trusted_ports', port_ids=list(port_ids))

    def filter_defer_apply_on(self):
        if self._deferred:
            return
        self._client.call('filter_defer_apply_on')
        self._batch_connection = self._client.connection_number
        self._ports_before = dict(self._ports)
        self._deferred = True

    def filter_defer_apply_off(self):
        if not self._deferred:
            return
        self._deferred = False
        try:
            if self._client.connection_number != self._batch_connection:
                raise AgentUnreachable(
                    'the connection to the sg agent at %s broke during a batch of '
                    'calls: the batch was not applied' % self.api_socket)
            # One apply for the whole batch; the answer comes once the ports it prepared
            # or updated are enforced.
            self._client.call('filter_defer_apply_off', wait_s=self.enforce_timeout,
                              reconnect=False)
        except AgentUnreachable:
            self._batch_lost()
            raise
        self._ports_before = None


class SgHybridFirewallDriver(SgFirewallDriver):
    """``firewall_driver = sg_hybrid`` for neutron-openvswitch-agent: Nova plugs each VM hybrid
    (tap ``tap<port id[:11]>`` on a Linux bridge ``qbr<port id[:11]>``), and the device
    Neutron names is the port id."""

    OVS_HYBRID_PLUG_REQUIRED = True
    PLUG = 'hybrid'
