#!/usr/bin/env python3
"""One-rule updates through a Neutron firewall driver, timed from the driver call to the rule
being enforced (sg-bench's `driver` section; `cargo xtask bench`).

A port whose group has N rules; each repeat adds one rule to the group, or removes it again,
the way Neutron's agent handles `security_groups_rule_updated` (security_group_updated, then
refresh_firewall: in one defer_apply batch, update_security_group_rules and
update_port_filter). The time is the batch's: for sg_hybrid, until the sg agent has applied
the change and the port's tap enforces it; for Neutron's iptables_hybrid, until its
iptables-restore returned (the kernel then enforces it).

Usage: bench_driver.py --driver sg_hybrid --socket PATH --rules 100 --repeats 200
       bench_driver.py --driver iptables_hybrid --netns NS --rules 100 --repeats 200
Prints {"driver": ..., "rules": N, "seconds": [...]} on stdout.
"""

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', 'oracle'))

import neutron_oracle as oracle  # noqa: E402

PORT_ID = 'adcc4b66-c1e2-4b9a-9d3f-5a7c2e8b1f04'  # tap tapadcc4b66-c1
GROUP = 'bench-group'


def rules(n):
    out = [{'direction': 'egress', 'ethertype': 'IPv4', 'stateful': True}]
    for i in range(n - 1):
        out.append({'direction': 'ingress', 'ethertype': 'IPv4', 'protocol': 'tcp',
                    'port_range_min': 1000 + i, 'port_range_max': 1000 + i,
                    'source_ip_prefix': '10.%d.%d.0/24' % (i // 256, i % 256),
                    'stateful': True})
    return out


EXTRA = {'direction': 'ingress', 'ethertype': 'IPv4', 'protocol': 'tcp',
         'port_range_min': 7777, 'port_range_max': 7777,
         'source_ip_prefix': '198.18.0.0/15', 'stateful': True}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--driver', choices=['sg_hybrid', 'iptables_hybrid'], required=True)
    ap.add_argument('--socket')
    ap.add_argument('--netns')
    ap.add_argument('--rules', type=int, default=100)
    ap.add_argument('--repeats', type=int, default=200)
    ap.add_argument('--warmup', type=int, default=10)
    args = ap.parse_args()

    oracle.bootstrap('ovs-hybrid')
    cfg = oracle.N['cfg']
    if args.driver == 'sg_hybrid':
        from sg_neutron import driver as sg_driver
        fw = sg_driver.SgHybridFirewallDriver(api_socket=args.socket)
    else:
        from neutron import privileged
        from neutron.agent.linux import iptables_firewall
        from neutron.agent.linux import utils as linux_utils
        # Root already: privileged calls run in this process, commands through the helper.
        privileged.default.set_client_mode(False)
        cfg.CONF.set_override('root_helper', os.path.join(HERE, 'roothelper'), 'AGENT')
        assert linux_utils.execute  # the real one: the oracle replaces it only in its runs
        fw = iptables_firewall.OVSHybridIptablesFirewallDriver(namespace=args.netns)

    port = {'id': PORT_ID, 'device': PORT_ID, 'mac_address': 'fa:16:3e:dc:d2:ab',
            'fixed_ips': ['192.168.206.6'], 'allowed_address_pairs': [],
            'device_owner': 'compute:nova', 'port_security_enabled': True,
            'security_groups': [GROUP], 'network_id': '9b2d5f3e-6a41-4c8e-b7d2-1e0f3a5c6d78',
            'security_group_rules': [], 'security_group_source_groups': []}
    base = rules(args.rules)
    with fw.defer_apply():
        fw.update_security_group_rules(GROUP, base)
        fw.prepare_port_filter(port)

    variants = [base[:len(base) // 2] + [EXTRA] + base[len(base) // 2:], base]
    seconds = []
    for i in range(args.warmup + args.repeats):
        new = variants[i % 2]
        t = time.perf_counter()
        fw.security_group_updated('sg_rule', {GROUP})
        with fw.defer_apply():
            fw.update_security_group_rules(GROUP, new)
            fw.update_port_filter(port)
        dt = time.perf_counter() - t
        if i >= args.warmup:
            seconds.append(dt)
    sys.stdout.write(json.dumps({'driver': args.driver, 'rules': len(base),
                                 'seconds': seconds}) + '\n')
    sys.stdout.flush()
    oracle.cleanup()
    os._exit(0)


if __name__ == '__main__':
    main()
