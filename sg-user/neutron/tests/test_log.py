"""Unit tests of sg_neutron's security-group logging against a scripted agent (test_driver's
FakeAgent), with Neutron's own log extension and driver base classes. The agent side of the
same calls is tested by tests/tests/neutron.rs (log objects through the API)."""

import os
import tempfile
import unittest

from sg_neutron import log as sg_log
from test_driver import FakeAgent


class FakeLog:
    """What Neutron's notifications carry: a Log versioned object's fields."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


class FakeServer:
    """The server's answer to get_sg_log_info_for_port."""

    def __init__(self, infos):
        self.infos = infos
        self.asked = []

    def get_sg_log_info_for_port(self, context, resource_type, port_id):
        self.asked.append((resource_type, port_id))
        return self.infos.get(port_id, [])


def info(log_id, port_id, event='ALL'):
    return {'id': log_id, 'project_id': 'proj', 'event': event,
            'ports_log': [{'port_id': port_id, 'security_group_rules': []}]}


class LogDriverTest(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='sg-neutron-log-test-')
        self.path = os.path.join(self.dir, 'agent.sock')
        self.agent = FakeAgent(self.path)
        self.addCleanup(self.agent.close)
        self.addCleanup(os.rmdir, self.dir)
        self.addCleanup(lambda: os.path.exists(self.path) and os.unlink(self.path))

    def driver(self, server=None):
        d = sg_log.SgLoggingDriver(api_socket=self.path, request_timeout=5)
        self.addCleanup(d._client.close)
        d.initialize(server or FakeServer({}))
        return d

    def calls(self, op):
        return [r for r in self.agent.requests if r['op'] == op]

    def test_is_neutrons_log_driver_and_extension(self):
        from neutron.services.logapi.agent import log_extension
        self.assertIsInstance(self.driver(), log_extension.LoggingDriver)
        self.assertTrue(issubclass(sg_log.SgLoggingExtension,
                                   log_extension.LoggingExtension))

    def test_notified_objects_go_to_the_agent_whole(self):
        d = self.driver()
        log = FakeLog(id='log-1', name='web', project_id='proj', resource_type='security_group',
                      resource_id='sg-web', target_id=None, event='DROP', enabled=True)
        d.start_logging(None, log_resources=[log])
        self.assertEqual(self.calls('update_log')[0]['log'], {
            'id': 'log-1', 'name': 'web', 'project_id': 'proj',
            'resource_type': 'security_group', 'resource_id': 'sg-web', 'event': 'DROP',
            'enabled': True})
        # Disabled by an update: kept, disabled; deleted: removed.
        log.enabled = False
        d.stop_logging(None, log_resources=[log])
        self.assertEqual(self.calls('update_log')[-1]['log']['enabled'], False)
        log.enabled = True
        d.stop_logging(None, log_resources=[log])
        self.assertEqual(self.calls('delete_log')[-1]['log_id'], 'log-1')

    def test_a_port_coming_up_brings_the_objects_covering_it_with_their_ports(self):
        server = FakeServer({'p1': [info('log-a', 'p1')], 'p2': [info('log-a', 'p2')]})
        d = self.driver(server)
        d.start_logging(None, port_id='p1')
        d.start_logging(None, port_id='p2')
        self.assertEqual(server.asked, [('security_group', 'p1'), ('security_group', 'p2')])
        pushed = [r['log'] for r in self.calls('update_log')]
        self.assertEqual(pushed[-1], {'id': 'log-a', 'project_id': 'proj',
                                      'resource_type': 'security_group', 'event': 'ALL',
                                      'enabled': True, 'port_ids': ['p1', 'p2']})
        # Once the agent holds the whole object, a port does not narrow it again.
        d.start_logging(None, log_resources=[FakeLog(
            id='log-a', project_id='proj', resource_type='security_group', resource_id=None,
            target_id=None, event='ALL', enabled=True)])
        n = len(self.calls('update_log'))
        d.start_logging(None, port_id='p1')
        self.assertEqual(len(self.calls('update_log')), n)

    def test_the_agent_extension_loads_sgs_driver_by_its_alias(self):
        # What Neutron's agent extension manager does with `[agent] extensions = sg_log`.
        from neutron.agent import agent_extensions_manager as mgr
        from neutron.conf.agent import agent_extensions_manager as mgr_conf
        from oslo_config import cfg
        conf = cfg.ConfigOpts()
        mgr_conf.register_agent_ext_manager_opts(conf)
        conf.set_override('extensions', ['sg_log'], 'agent')
        m = mgr.AgentExtensionsManager(conf, 'neutron.agent.l2.extensions')
        self.assertIsInstance(m['sg_log'].obj, sg_log.SgLoggingExtension)
        from neutron import manager
        cls = manager.NeutronManager.load_class_for_provider(
            'neutron.services.logapi.drivers', 'sg')
        self.assertIs(cls, sg_log.SgLoggingDriver)

    def test_other_resource_types_are_not_sent(self):
        d = self.driver()
        d.start_logging(None, log_resources=[FakeLog(id='fw', resource_type='firewall_group',
                                                     event='ALL', enabled=True)])
        self.assertEqual(self.calls('update_log'), [])


if __name__ == '__main__':
    unittest.main()
