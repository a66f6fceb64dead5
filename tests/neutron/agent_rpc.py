#!/usr/bin/env python3
"""Neutron's agent side, driving the sg firewall driver as an L2 agent does.

Neutron's own SecurityGroupAgentRpc loads the driver by its alias (`[SECURITYGROUP]
firewall_driver`, resolved through the `neutron.agent.firewall_drivers` entry points) and
calls it from its RPC handlers. The server side is Neutron's own
SecurityGroupServerRpcCallback over an input document in the API's shape, as in Neutron's unit
tests a fake plugin stands in for the database (tests/oracle/neutron_oracle.py provides it).

Used by tests/tests/neutron.rs and `cargo xtask demo --neutron`. Reads one command per line on
stdin, answers `ok [json]` or `error <message>` on one line of stdout:

  load FILE               the server's database is now this document (API shape)
  prepare DEVICE...       prepare_devices_filter  (a new port on the host)
  port_updated DEVICE...  setup_port_filters(set(), devices)  (a port's groups changed)
  rule_updated SG...      security_groups_rule_updated
  member_updated SG...    security_groups_member_updated
  remove DEVICE...        remove_devices_filter
  ports                   the devices the driver filters (`firewall.ports`)
  driver                  the driver's class

Usage: agent_rpc.py --driver sg|sg_hybrid --socket PATH
"""

import argparse
import json
import os
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', 'oracle'))

import neutron_oracle as oracle  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--driver', choices=['sg', 'sg_hybrid'], default='sg')
    ap.add_argument('--socket', required=True)
    args = ap.parse_args()
    agent_kind = 'linuxbridge' if args.driver == 'sg' else 'ovs-hybrid'
    oracle.bootstrap(agent_kind)
    N = oracle.N
    cfg = N['cfg']
    cfg.CONF.set_override('firewall_driver', args.driver, 'SECURITYGROUP')
    # The driver registers [sg] when it is imported; import it through Neutron's loader below,
    # then point it at the agent.
    from neutron.agent import firewall
    cls = firewall.load_firewall_driver_class(args.driver)
    cfg.CONF.set_override('api_socket', args.socket, 'sg')

    state = {'rpc': None}

    class PluginRpc:
        def security_group_info_for_devices(self, context, devices):
            return state['rpc'].security_group_info_for_devices(context, devices)

    ctx = N['n_context'].get_admin_context()
    sg_agent = N['agent_sg_rpc'].SecurityGroupAgentRpc(ctx, PluginRpc())
    assert type(sg_agent.firewall) is cls, (type(sg_agent.firewall), cls)

    def reply(text):
        sys.stdout.write(text + '\n')
        sys.stdout.flush()

    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        cmd, rest = words[0], words[1:]
        try:
            out = None
            if cmd == 'load':
                with open(rest[0]) as f:
                    doc = json.load(f)
                sgs, ags, ports = oracle.normalize_input(doc)
                if agent_kind == 'ovs-hybrid':
                    for p in ports:
                        p['device'] = p['id']
                    state['rpc'] = oracle.make_hybrid_server(sgs, ags, ports)
                else:
                    state['rpc'] = oracle.make_lb_server(sgs, ags, ports)
            elif cmd == 'prepare':
                sg_agent.prepare_devices_filter(rest)
            elif cmd == 'port_updated':
                sg_agent.setup_port_filters(set(), set(rest))
            elif cmd == 'rule_updated':
                sg_agent.security_groups_rule_updated(rest)
            elif cmd == 'member_updated':
                sg_agent.security_groups_member_updated(rest)
            elif cmd == 'remove':
                sg_agent.remove_devices_filter(rest)
            elif cmd == 'ports':
                out = sorted(sg_agent.firewall.ports)
            elif cmd == 'driver':
                f = sg_agent.firewall
                out = {'class': '%s.%s' % (type(f).__module__, type(f).__name__),
                       'hybrid': bool(getattr(f, 'OVS_HYBRID_PLUG_REQUIRED', False))}
            else:
                raise ValueError('unknown command %r' % cmd)
            reply('ok' if out is None else 'ok ' + json.dumps(out))
        except Exception as e:  # every failure is an answer, the process goes on
            sys.stderr.write(traceback.format_exc())
            reply('error %s: %s' % (type(e).__name__, str(e).replace('\n', ' | ')))
    sys.stdout.flush()
    oracle.cleanup()
    os._exit(0)


if __name__ == '__main__':
    main()
