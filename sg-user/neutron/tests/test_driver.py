"""Unit tests of the sg_neutron driver against a scripted agent on a real Unix socket.

Run by `cargo xtask test` (and `cargo xtask neutron`) with the Neutron virtualenv's python, so
that the driver is checked against Neutron's own FirewallDriver base class:
    python -m unittest discover -s sg-user/neutron/tests -t sg-user/neutron
The driver against the real agent is tested by tests/tests/neutron.rs and by Neutron's
functional suite (`cargo xtask neutron`).
"""

import json
import os
import socket
import tempfile
import threading
import unittest

from sg_neutron import driver as sg_driver
from sg_neutron.client import AgentError, AgentUnreachable


class FakeAgent:
    """Answers every request with ok (or a scripted error) and records them."""

    def __init__(self, path):
        self.path = path
        self.requests = []
        self.fail = {}  # op -> error dict
        self.drop_on = None  # op on which the connection is closed without answer
        self.connections = 0
        self.open = []  # accepted connections, for restart()
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            self.connections += 1
            self.open.append(conn)
            threading.Thread(target=self._conn, args=(conn,), daemon=True).start()

    def _conn(self, conn):
        f = conn.makefile('rb')
        while True:
            line = f.readline()
            if not line:
                break
            req = json.loads(line)
            self.requests.append(req)
            if req['op'] == self.drop_on:
                self.drop_on = None
                break
            resp = {'v': 1, 'id': req.get('id'), 'ok': True, 'generation': 1}
            if req['op'] in self.fail:
                resp = {'v': 1, 'id': req.get('id'), 'ok': False,
                        'error': self.fail[req['op']]}
            conn.sendall(json.dumps(resp).encode() + b'\n')
        f.close()
        conn.close()

    def restart(self):
        """What an agent restart does to the driver's connection: it is closed, unanswered."""
        for conn in self.open:
            conn.shutdown(socket.SHUT_RDWR)
        self.open = []

    def ops(self):
        return [r['op'] for r in self.requests if r['op'] != 'hello']

    def close(self):
        self.srv.close()


def port(device, sgs=('sg1',)):
    return {'device': device, 'mac_address': 'fa:16:3e:11:22:33',
            'fixed_ips': ['10.0.0.5'], 'security_groups': list(sgs),
            'network_id': 'net', 'port_security_enabled': True}


class DriverTest(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='sg-neutron-test-')
        self.path = os.path.join(self.dir, 'agent.sock')
        self.agent = FakeAgent(self.path)
        self.addCleanup(self.agent.close)
        self.addCleanup(os.rmdir, self.dir)
        self.addCleanup(lambda: os.path.exists(self.path) and os.unlink(self.path))

    def driver(self, cls=sg_driver.SgFirewallDriver, **kw):
        kw.setdefault('api_socket', self.path)
        kw.setdefault('request_timeout', 5)
        d = cls(**kw)
        self.addCleanup(d._client.close)
        return d

    def test_is_a_neutron_firewall_driver_built_with_or_without_the_bridge(self):
        from neutron.agent import firewall
        for kw in ({}, {'integration_bridge': object()}):
            d = self.driver(**kw)
            self.assertIsInstance(d, firewall.FirewallDriver)
        self.assertFalse(getattr(sg_driver.SgFirewallDriver,
                                 'OVS_HYBRID_PLUG_REQUIRED', False))
        self.assertTrue(sg_driver.SgHybridFirewallDriver.OVS_HYBRID_PLUG_REQUIRED)

    def test_hello_names_the_plugging_once_per_connection(self):
        d = self.driver(cls=sg_driver.SgHybridFirewallDriver)
        d.update_security_group_rules('sg1', [])
        d.update_security_group_rules('sg2', [])
        hellos = [r for r in self.agent.requests if r['op'] == 'hello']
        self.assertEqual(len(hellos), 1)
        self.assertEqual(hellos[0]['plug'], 'hybrid')
        self.assertEqual(hellos[0]['v'], 1)

    def test_a_batch_is_one_apply_and_waits_for_its_ports_at_the_end(self):
        d = self.driver(enforce_timeout=7)
        with d.defer_apply():
            d.update_security_group_rules('sg1', [{'direction': 'ingress', 'ethertype': 'IPv4'}])
            d.update_security_group_members('sg1', {'IPv4': {('10.0.0.9', None)}})
            d.prepare_port_filter(port('tap1'))
            d.process_trusted_ports(['tapdhcp'])
        self.assertEqual(self.agent.ops(), [
            'filter_defer_apply_on', 'update_security_group_rules',
            'update_security_group_members', 'prepare_port_filter',
            'process_trusted_ports', 'filter_defer_apply_off'])
        reqs = {r['op']: r for r in self.agent.requests}
        self.assertNotIn('wait_ms', reqs['prepare_port_filter'])
        self.assertEqual(reqs['filter_defer_apply_off']['wait_ms'], 7000)
        # Sets of tuples travel as lists of [ip, mac].
        self.assertEqual(reqs['update_security_group_members']['members'],
                         {'IPv4': [['10.0.0.9', None]]})
        self.assertEqual(list(d.ports), ['tap1'])

    def test_prepare_outside_a_batch_waits_for_enforcement(self):
        d = self.driver(enforce_timeout=2.5)
        d.prepare_port_filter(port('tap1'))
        req = self.agent.requests[-1]
        self.assertEqual((req['op'], req['wait_ms']), ('prepare_port_filter', 2500))
        self.assertEqual(req['port']['device'], 'tap1')

    def test_a_refused_call_raises_with_the_agents_errors_and_records_nothing(self):
        self.agent.fail['prepare_port_filter'] = {
            'kind': 'invalid', 'message': 'port tap1: fixed_ips[0]="x": not an address',
            'errors': [{'object': 'port', 'id': 'tap1', 'field': 'fixed_ips[0]',
                        'value': '"x"', 'reason': 'not a valid IP address'}]}
        d = self.driver()
        with self.assertRaises(AgentError) as ctx:
            d.prepare_port_filter(port('tap1'))
        self.assertEqual(ctx.exception.kind, 'invalid')
        self.assertEqual(ctx.exception.errors[0]['field'], 'fixed_ips[0]')
        self.assertIn('fixed_ips[0]', str(ctx.exception))
        self.assertEqual(d.ports, {})

    def test_updates_and_removals_of_unknown_ports_send_nothing(self):
        d = self.driver()
        d.update_port_filter(port('tap9'))
        d.remove_port_filter(port('tap9'))
        self.assertEqual(self.agent.ops(), [])
        d.prepare_port_filter(port('tap1'))
        d.update_port_filter(port('tap1', sgs=('sg2',)))
        d.remove_port_filter(port('tap1'))
        self.assertEqual(self.agent.ops(), ['prepare_port_filter', 'update_port_filter',
                                            'remove_port_filter'])
        self.assertEqual(d.ports, {})

    def test_security_group_updated_and_trusted_ports_are_one_request_each(self):
        d = self.driver()
        d.security_group_updated('sg_rule', {'sg1'})
        d.process_trusted_ports(['tapdhcp'])
        d.remove_trusted_ports(['tapdhcp'])
        d.process_trusted_ports([])
        self.assertEqual(self.agent.ops(), ['security_group_updated',
                                            'process_trusted_ports',
                                            'remove_trusted_ports'])
        self.assertEqual(self.agent.requests[-3]['sec_group_ids'], ['sg1'])

    def test_an_unreachable_agent_raises_a_clear_exception(self):
        d = self.driver(api_socket=os.path.join(self.dir, 'nobody.sock'))
        with self.assertRaises(AgentUnreachable) as ctx:
            d.prepare_port_filter(port('tap1'))
        self.assertIn('nobody.sock', str(ctx.exception))
        self.assertIn('sg agent --api-socket', str(ctx.exception))
        self.assertEqual(d.ports, {})

    def test_a_connection_lost_in_a_batch_fails_the_batch_and_the_next_call_reconnects(self):
        d = self.driver()
        self.agent.drop_on = 'update_security_group_rules'
        with self.assertRaises(AgentUnreachable):
            with d.defer_apply():
                d.prepare_port_filter(port('tap1'))
                d.update_security_group_rules('sg1', [])
        # Nothing of the lost batch is recorded; the next call opens a new connection.
        self.assertEqual(d.ports, {})
        d.update_security_group_rules('sg1', [])
        self.assertEqual(self.agent.connections, 2)
        self.assertNotIn('filter_defer_apply_off', self.agent.ops())

    def test_a_call_after_an_agent_restart_goes_to_the_new_agent(self):
        # Neutron's OVS agent calls security_group_updated from a callback that only logs an
        # exception: a call lost to a restart would never be repeated (found by
        # `cargo xtask cloud`).
        d = self.driver(cls=sg_driver.SgHybridFirewallDriver)
        d.update_security_group_rules('sg1', [])
        self.agent.restart()
        d.security_group_updated('sg_rule', ['sg1'])
        self.assertEqual(self.agent.connections, 2)
        self.assertEqual(self.agent.ops(), ['update_security_group_rules',
                                            'security_group_updated'])
        hellos = [r for r in self.agent.requests if r['op'] == 'hello']
        self.assertEqual(len(hellos), 2)

    def test_a_fresh_connection_that_breaks_is_not_retried(self):
        d = self.driver()
        self.agent.drop_on = 'update_security_group_rules'
        with self.assertRaises(AgentUnreachable):
            d.update_security_group_rules('sg1', [])
        self.assertEqual(self.agent.connections, 1)

    def test_entry_points_name_both_drivers(self):
        from importlib import metadata
        eps = metadata.entry_points()
        group = (eps.select(group='neutron.agent.firewall_drivers')
                 if hasattr(eps, 'select') else eps['neutron.agent.firewall_drivers'])
        found = {e.name: e.value for e in group if e.value.startswith('sg_neutron')}
        self.assertEqual(found, {'sg': 'sg_neutron.driver:SgFirewallDriver',
                                 'sg_hybrid': 'sg_neutron.driver:SgHybridFirewallDriver'})


if __name__ == '__main__':
    unittest.main()
