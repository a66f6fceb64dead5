"""`cargo xtask cloud`: a real Neutron control plane on one machine, driving sg.

One controller namespace holds MariaDB, RabbitMQ and Neutron 29 (the API under a WSGI server
with auth_strategy = noauth, the RPC server, the periodic workers; ML2 with the openvswitch
mechanism driver and a flat provider network). Two compute-node namespaces each hold their own
ovsdb-server and ovs-vswitchd (userspace datapath, datapath_type = netdev, the kernel has no
openvswitch module), a neutron-openvswitch-agent with firewall_driver = sg_hybrid and its own
host name, an sg agent serving the driver's API socket, and VMs plugged as os-vif plugs them
for Nova (tap on qbr, qvb/qvo veth pair, qvo in br-int with the iface-id external ids).

    controller ns  mgmt bridge 10.250.0.1/24 -- veth -- node ns 10.250.0.1x  (RPC over AMQP)
    node1 ns br-phys port "data" -- veth -- node2 ns br-phys port "data"        (physnet1, flat)

This process moves itself into the controller namespace before it starts anything, so every
service it starts listens there (loopback and the management bridge), never in the host's
namespace. Each component logs to LOGDIR/<component>.log; a failure names the component and
prints the tail of its log. Everything is stopped and every namespace, pin root and file under
the run directory is removed on the way out, whatever happened.

Usage: python cloud.py RUN_DIR SG_BIN SITE_DIR [--timings ROUNDS OUT_DIR]
(without --timings: the scenario; with it: the change-to-wire timings, into OUT_DIR/cloud.md)
"""

import contextlib
import ctypes
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

VENV_BIN = os.path.dirname(sys.executable)
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
ROOTHELPER = os.path.join(ROOT, "tests/neutron/roothelper")

MGMT_NET = "10.250.0"
CTL_IP = MGMT_NET + ".1"
DATA_CIDR = "192.168.50.0/24"
PROJECT = "5a1e0c0ffee0000000000000000000cd"
API_PORT = 9696


class Failure(Exception):
    pass


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(*cmd, check=True, env=None, input=None):
    p = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, env=env, input=input
    )
    if check and p.returncode != 0:
        raise Failure(
            f"{' '.join(map(str, cmd))} exited {p.returncode}: {p.stderr.strip() or p.stdout.strip()}"
        )
    return p.stdout


def ns_run(ns, *cmd, check=True):
    return run("ip", "netns", "exec", ns, *cmd, check=check)


def enter_netns(name):
    """Moves this (still single-threaded) process into the named network namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            raise Failure(f"setns {name}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def tail(path, lines=30):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


class Deployment:
    def __init__(self, run_dir, sg_bin, site):
        self.run_dir = os.path.abspath(run_dir)
        self.logs = os.path.join(self.run_dir, "logs")
        self.sg_bin = sg_bin
        self.site = site
        tag = f"{os.getpid() % 100000}"
        self.prefix = f"sgcloud-{tag}"
        self.ctl = f"{self.prefix}-ctl"
        self.namespaces = []
        self.procs = {}  # component name -> (Popen, log path)
        self.pin_roots = []
        os.makedirs(self.logs, exist_ok=True)
        # For `cargo xtask cloud`, which removes whatever this process could not (it was
        # killed): every namespace and pin root of the run starts with this prefix.
        with open(os.path.join(self.run_dir, "prefix"), "w") as f:
            f.write(self.prefix)

    # -- processes ---------------------------------------------------------------------

    def start(self, name, cmd, ns=None, env=None, cwd=None, pipes=False):
        path = os.path.join(self.logs, f"{name}.log")
        out = open(path, "ab")
        full = [str(c) for c in cmd]
        if ns:
            full = ["ip", "netns", "exec", ns] + full
        e = dict(os.environ)
        e.update(env or {})
        p = subprocess.Popen(
            full,
            stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipes else out,
            stderr=out if pipes else subprocess.STDOUT,
            text=pipes,
            env=e,
            cwd=cwd,
            start_new_session=True,
        )
        out.close()
        self.procs[name] = (p, path)
        log(f"started {name} (pid {p.pid}, log {os.path.relpath(path, self.run_dir)})")
        return p

    def stop(self, name, sig=signal.SIGTERM, timeout=15):
        p, _ = self.procs.pop(name)
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def check_alive(self, name):
        p, path = self.procs[name]
        if p.poll() is not None:
            raise Failure(
                f"component {name} exited with {p.returncode}; tail of {path}:\n{tail(path)}"
            )

    def wait_for(self, what, pred, timeout, component=None, interval=0.2):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if component:
                self.check_alive(component)
            try:
                r = pred()
                if r:
                    return r
            except Exception as e:  # noqa: BLE001 - reported on timeout
                last = e
            time.sleep(interval)
        msg = f"timed out after {timeout}s waiting for {what}"
        if last:
            msg += f" (last error: {last})"
        if component:
            path = self.procs[component][1]
            msg += f"\ncomponent {component}; tail of {path}:\n{tail(path)}"
        raise Failure(msg)

    # -- namespaces and wiring ---------------------------------------------------------

    def add_ns(self, name):
        run("ip", "netns", "add", name)
        self.namespaces.append(name)
        ns_run(name, "ip", "link", "set", "lo", "up")
        return name

    def teardown(self):
        log("teardown")
        # A second signal (timeout(1) forwards one, Ctrl-C twice) must not cut the teardown.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # All at once: SIGTERM to every component, a shared grace period, then SIGKILL.
        for name, (p, _) in self.procs.items():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for name, (p, _) in self.procs.items():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log(f"{name} ignored SIGTERM for 10s: SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()
        # Daemons that detach from their starter (epmd, privsep helpers, dnsmasq...) still live
        # in our namespaces: everything in a namespace of ours is ours.
        for ns in self.namespaces:
            pids = run("ip", "netns", "pids", ns, check=False).split()
            for pid in pids:
                if pid != str(os.getpid()):  # this process lives in the controller namespace
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
        for ns in reversed(self.namespaces):
            run("ip", "netns", "del", ns, check=False)
        for pin in self.pin_roots:
            shutil.rmtree(pin, ignore_errors=True)

    # -- the controller ----------------------------------------------------------------

    def controller_network(self):
        self.add_ns(self.ctl)
        enter_netns(self.ctl)
        run("ip", "link", "add", "mgmt", "type", "bridge")
        run("ip", "addr", "add", f"{CTL_IP}/24", "dev", "mgmt")
        run("ip", "link", "set", "mgmt", "up")

    def start_mariadb(self):
        """MariaDB on a Unix socket only (--skip-networking): only the controller uses it."""
        d = os.path.join(self.run_dir, "mariadb")
        os.makedirs(d)
        self.db_socket = os.path.join(d, "mysqld.sock")
        with open(os.path.join(self.logs, "mariadb-install.log"), "w") as out:
            r = subprocess.run(
                [
                    "mariadb-install-db", "--no-defaults", "--user=root",
                    f"--datadir={d}/data", "--auth-root-authentication-method=normal",
                    "--skip-test-db",
                ],
                stdout=out, stderr=subprocess.STDOUT,
            )
        if r.returncode:
            raise Failure(f"mariadb-install-db failed; {tail(out.name)}")
        self.start(
            "mariadb",
            [
                "mariadbd", "--no-defaults", "--user=root", f"--datadir={d}/data",
                f"--socket={self.db_socket}", "--skip-networking",
                f"--pid-file={d}/mariadbd.pid", "--innodb-buffer-pool-size=64M",
                "--innodb-flush-log-at-trx-commit=2", "--character-set-server=utf8mb4",
            ],
        )
        self.wait_for(
            "MariaDB's socket",
            lambda: run("mariadb", "--no-defaults", f"--socket={self.db_socket}", "-uroot",
                        "-e", "CREATE DATABASE IF NOT EXISTS neutron", check=True) is not None,
            60, "mariadb",
        )

    def start_rabbitmq(self):
        d = os.path.join(self.run_dir, "rabbitmq")
        os.makedirs(d)
        with open(os.path.join(d, "rabbitmq.conf"), "w") as f:
            f.write(
                f"listeners.tcp.default = {CTL_IP}:5672\n"
                # The compute nodes log in from the management network.
                "loopback_users = none\n"
            )
        with open(os.path.join(d, "enabled_plugins"), "w") as f:
            f.write("[].\n")
        self.rabbit_env = {
            "HOME": d,  # the Erlang cookie
            "RABBITMQ_NODENAME": "sgcloud@localhost",
            "RABBITMQ_CONFIG_FILE": os.path.join(d, "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(d, "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": os.path.join(d, "mnesia"),
            "RABBITMQ_LOG_BASE": os.path.join(self.logs, "rabbitmq"),
            "RABBITMQ_LOGS": "-",
            "RABBITMQ_PID_FILE": os.path.join(d, "rabbit.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }
        self.start("rabbitmq", ["/usr/lib/rabbitmq/bin/rabbitmq-server"], env=self.rabbit_env)

        def amqp_up():
            with socket.create_connection((CTL_IP, 5672), timeout=1):
                return True

        self.wait_for("RabbitMQ on 5672", amqp_up, 120, "rabbitmq", interval=0.5)

    def neutron_env(self):
        return {
            "PYTHONPATH": self.site,
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
        }

    def write_neutron_conf(self):
        etc = os.path.join(self.run_dir, "etc")
        os.makedirs(etc)
        state = os.path.join(self.run_dir, "state")
        os.makedirs(state)
        self.etc = etc
        shutil.copy(os.path.join(HERE, "api-paste.ini"), etc)
        transport = f"rabbit://guest:guest@{CTL_IP}:5672/"
        with open(os.path.join(etc, "neutron.conf"), "w") as f:
            f.write(f"""[DEFAULT]
core_plugin = ml2
service_plugins =
auth_strategy = noauth
api_paste_config = {etc}/api-paste.ini
transport_url = {transport}
state_path = {state}
notify_nova_on_port_status_changes = false
notify_nova_on_port_data_changes = false
rpc_workers = 1
rpc_state_report_workers = 1
api_workers = 1
agent_down_time = 30
debug = true
use_stderr = true

[database]
connection = mysql+pymysql://root@localhost/neutron?unix_socket={self.db_socket}&charset=utf8mb4

[oslo_concurrency]
lock_path = {state}/lock

[ml2]
type_drivers = flat
tenant_network_types =
mechanism_drivers = openvswitch
extension_drivers = port_security

[ml2_type_flat]
flat_networks = physnet1

[securitygroup]
enable_security_group = true
""")
        self.neutron_conf = os.path.join(etc, "neutron.conf")

    def start_neutron(self):
        self.write_neutron_conf()
        env = self.neutron_env()
        with open(os.path.join(self.logs, "neutron-db-manage.log"), "w") as out:
            t = time.monotonic()
            r = subprocess.run(
                [f"{VENV_BIN}/neutron-db-manage", "--config-file", self.neutron_conf,
                 "upgrade", "heads"],
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env},
            )
        if r.returncode:
            raise Failure(f"neutron-db-manage upgrade heads failed:\n{tail(out.name)}")
        log(f"neutron-db-manage upgrade heads: {time.monotonic() - t:.0f}s")
        conf = ["--config-file", self.neutron_conf]
        self.start("neutron-api", [sys.executable, os.path.join(HERE, "api_server.py"), *conf],
                   env={**env, "SG_CLOUD_API_LISTEN": f"127.0.0.1:{API_PORT}"})
        self.start("neutron-rpc-server", [f"{VENV_BIN}/neutron-rpc-server", *conf], env=env)
        self.start("neutron-periodic-workers", [f"{VENV_BIN}/neutron-periodic-workers", *conf],
                   env=env)
        self.wait_for("the Neutron API", lambda: self.api("GET", "/v2.0/networks") is not None,
                      120, "neutron-api", interval=0.5)

    # -- REST --------------------------------------------------------------------------

    def api(self, method, path, body=None):
        req = urllib.request.Request(
            f"http://127.0.0.1:{API_PORT}{path}",
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                data = r.read()
        except urllib.error.HTTPError as e:
            raise Failure(f"{method} {path}: HTTP {e.code}: {e.read().decode(errors='replace')}")
        return json.loads(data) if data else {}


class Node:
    """A compute node: its namespace, OVS, neutron-openvswitch-agent and sg agent."""

    def __init__(self, d, index):
        self.d = d
        self.index = index
        self.host = f"node{index}"
        self.ns = f"{d.prefix}-n{index}"
        self.dir = os.path.join(d.run_dir, self.host)
        self.ovs_run = os.path.join(self.dir, "ovs")
        self.db_sock = os.path.join(self.ovs_run, "db.sock")
        self.sg_run = os.path.join(self.dir, "sg")
        self.sg_socket = os.path.join(self.sg_run, "agent.sock")
        self.pin_root = f"/sys/fs/bpf/{d.prefix}-n{index}"
        self.mgmt_ip = f"{MGMT_NET}.1{index}"
        self.firewall_driver = os.environ.get("SG_CLOUD_DRIVER", "sg_hybrid")
        os.makedirs(self.ovs_run)
        os.makedirs(self.sg_run)

    def name(self, component):
        return f"{self.host}-{component}"

    def network(self):
        d = self.d
        d.add_ns(self.ns)
        run("ip", "link", "add", f"m{self.index}", "type", "veth", "peer", "name", "mgmt",
            "netns", self.ns)
        run("ip", "link", "set", f"m{self.index}", "master", "mgmt", "up")
        ns_run(self.ns, "ip", "addr", "add", f"{self.mgmt_ip}/24", "dev", "mgmt")
        ns_run(self.ns, "ip", "link", "set", "mgmt", "up")
        # Neutron's hybrid plugging needs bridged traffic through netfilter for iptables_hybrid
        # (the agent checks it); sg does not care.
        ns_run(self.ns, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1")
        ns_run(self.ns, "sysctl", "-qw", "net.bridge.bridge-nf-call-ip6tables=1")

    def ovs_env(self):
        return {"OVS_RUNDIR": self.ovs_run, "OVS_DBDIR": self.ovs_run, "OVS_LOGDIR": self.ovs_run}

    def vsctl(self, *args):
        return ns_run(self.ns, "ovs-vsctl", f"--db=unix:{self.db_sock}", "--timeout=20", *args)

    def start_ovs(self):
        d = self.d
        db = os.path.join(self.ovs_run, "conf.db")
        run("ovsdb-tool", "create", db, "/usr/share/openvswitch/vswitch.ovsschema")
        d.start(self.name("ovsdb-server"), [
            "ovsdb-server", db, f"--remote=punix:{self.db_sock}",
            "--remote=db:Open_vSwitch,Open_vSwitch,manager_options",
            f"--pidfile={self.ovs_run}/ovsdb-server.pid",
            f"--unixctl={self.ovs_run}/ovsdb-server.ctl", "-vconsole:info", "-vsyslog:off",
        ], ns=self.ns, env=self.ovs_env())
        d.wait_for(f"{self.host} ovsdb-server", lambda: os.path.exists(self.db_sock), 20,
                   self.name("ovsdb-server"))
        self.vsctl("--no-wait", "init")
        d.start(self.name("ovs-vswitchd"), [
            "ovs-vswitchd", f"unix:{self.db_sock}",
            f"--pidfile={self.ovs_run}/ovs-vswitchd.pid", "-vconsole:info", "-vsyslog:off",
        ], ns=self.ns, env=self.ovs_env())
        self.vsctl("add-br", "br-phys", "--", "set", "bridge", "br-phys", "datapath_type=netdev")
        self.vsctl("add-port", "br-phys", "data")
        ns_run(self.ns, "ip", "link", "set", "data", "up")

    def start_sg_agent(self):
        d = self.d
        d.pin_roots.append(self.pin_root)
        d.start(self.name("sg-agent"), [
            d.sg_bin, "--pin-root", self.pin_root, "--run-dir", self.sg_run, "agent",
            "--api-socket", self.sg_socket, "--netns", self.ns, "--host", self.host,
        ], env={"RUST_LOG": "info"})
        d.wait_for(f"{self.host} sg agent's API socket", lambda: os.path.exists(self.sg_socket),
                   30, self.name("sg-agent"))

    def write_agent_conf(self):
        state = os.path.join(self.dir, "state")
        os.makedirs(state, exist_ok=True)
        path = os.path.join(self.dir, "openvswitch_agent.ini")
        with open(path, "w") as f:
            f.write(f"""[DEFAULT]
host = {self.host}
transport_url = rabbit://guest:guest@{CTL_IP}:5672/
state_path = {state}
debug = true
use_stderr = true

[agent]
root_helper = {ROOTHELPER}
tunnel_types =
report_interval = 5

[ovs]
datapath_type = netdev
integration_bridge = br-int
bridge_mappings = physnet1:br-phys
ovsdb_connection = unix:{self.db_sock}
of_listen_address = 127.0.0.1

[securitygroup]
enable_security_group = true
firewall_driver = {self.firewall_driver}

[sg]
api_socket = {self.sg_socket}

[oslo_concurrency]
lock_path = {state}/lock
""")
        return path

    def start_ovs_agent(self):
        d = self.d
        conf = self.write_agent_conf()
        d.start(self.name("neutron-openvswitch-agent"), [
            f"{VENV_BIN}/neutron-openvswitch-agent", "--config-file", conf,
        ], ns=self.ns, env={**d.neutron_env(), **self.ovs_env()})

    def wait_agent_alive(self, timeout=120):
        def alive():
            agents = self.d.api("GET", f"/v2.0/agents?host={self.host}")["agents"]
            return [a for a in agents if a["alive"] and a["agent_type"] == "Open vSwitch agent"]

        return self.d.wait_for(f"{self.host}'s Open vSwitch agent alive in Neutron", alive,
                               timeout, self.name("neutron-openvswitch-agent"), interval=1)


class Vm:
    """A VM: a namespace whose eth0 is the far end of the tap, plugged as os-vif plugs a port
    for Nova with hybrid plugging: qbr<id> (Linux bridge) holding tap<id> and qvb<id>, whose
    veth peer qvo<id> is in br-int with the port's external_ids."""

    def __init__(self, d, node, name, port):
        self.d = d
        self.node = node
        self.name = name
        self.port = port
        self.id = port["id"]
        self.ip = port["fixed_ips"][0]["ip_address"]
        self.mac = port["mac_address"]
        self.ns = f"{d.prefix}-{name}"
        short = self.id[:11]
        self.tap, self.qbr, self.qvb, self.qvo = (f"{p}{short}" for p in ("tap", "qbr", "qvb", "qvo"))

    def plug(self):
        n = self.node
        self.d.add_ns(self.ns)
        ns_run(n.ns, "ip", "link", "add", self.qbr, "type", "bridge", "forward_delay", "0",
               "stp_state", "0")
        ns_run(n.ns, "ip", "link", "set", self.qbr, "up")
        ns_run(n.ns, "ip", "link", "add", self.qvb, "type", "veth", "peer", "name", self.qvo)
        ns_run(n.ns, "ip", "link", "set", self.qvb, "master", self.qbr, "up")
        ns_run(n.ns, "ip", "link", "set", self.qvo, "up")
        n.vsctl("--", "--may-exist", "add-port", "br-int", self.qvo,
                "--", "set", "Interface", self.qvo,
                f"external_ids:iface-id={self.id}", "external_ids:iface-status=active",
                f"external_ids:attached-mac={self.mac}",
                f"external_ids:vm-uuid={self.port['device_id']}")
        # libvirt's tap: here a veth whose far end is the VM's eth0.
        ns_run(n.ns, "ip", "link", "add", self.tap, "type", "veth", "peer", "name", "eth0",
               "netns", self.ns)
        ns_run(n.ns, "ip", "link", "set", self.tap, "master", self.qbr, "up")
        ns_run(self.ns, "ip", "link", "set", "eth0", "address", self.mac)
        # A veth hands its peer TCP/UDP segments with the checksum still to fill in
        # (CHECKSUM_PARTIAL); the userspace datapath reads them from qvo by AF_PACKET and sends
        # them on unchanged, so the receiver would drop every segment as corrupt. A VM's virtio
        # NIC has the host complete it; here the VM's kernel does it itself.
        ns_run(self.ns, "ethtool", "-K", "eth0", "tx", "off")
        ns_run(self.ns, "ip", "addr", "add", f"{self.ip}/24", "dev", "eth0")
        ns_run(self.ns, "ip", "link", "set", "eth0", "up")

    def probe(self, other, port, timeout_ms):
        """`allowed` or `blocked`: one new TCP connection to OTHER:PORT (tests/cloud/probe.py)."""
        name = f"{self.name}-probe"
        if name not in self.d.procs:
            self.d.start(name, [sys.executable, os.path.join(HERE, "probe.py")], ns=self.ns,
                         pipes=True)
        p = self.d.procs[name][0]
        p.stdin.write(f"{other.ip} {port} {timeout_ms}\n")
        p.stdin.flush()
        answer = p.stdout.readline().strip()
        if not answer:
            self.d.check_alive(name)
        return answer

    def serve_echo(self, port):
        """A TCP echo server on PORT, for the established connection across a restart."""
        self.d.start(f"{self.name}-tcp{port}", ["ncat", "-lk", "-p", str(port), "--exec",
                                                "/bin/cat"], ns=self.ns)


class Cloud:
    """The tenant side: network, groups and ports, through Neutron's REST API only."""

    def __init__(self, d):
        self.d = d

    def create_network(self):
        net = self.d.api("POST", "/v2.0/networks", {"network": {
            "name": "net1", "project_id": PROJECT, "provider:network_type": "flat",
            "provider:physical_network": "physnet1"}})["network"]
        self.d.api("POST", "/v2.0/subnets", {"subnet": {
            "name": "sub1", "project_id": PROJECT, "network_id": net["id"], "ip_version": 4,
            "cidr": DATA_CIDR, "enable_dhcp": False, "gateway_ip": None}})
        self.net = net
        return net

    def create_group(self, name, rules=()):
        sg = self.d.api("POST", "/v2.0/security-groups", {"security_group": {
            "name": name, "project_id": PROJECT}})["security_group"]
        for r in rules:
            self.add_rule(sg, **r)
        return sg

    def add_rule(self, sg, **rule):
        body = {"security_group_id": sg["id"], "project_id": PROJECT, "direction": "ingress",
                "ethertype": "IPv4", **rule}
        return self.d.api("POST", "/v2.0/security-group-rules",
                          {"security_group_rule": body})["security_group_rule"]

    def delete_rule(self, rule):
        self.d.api("DELETE", f"/v2.0/security-group-rules/{rule['id']}")

    def create_port(self, name, node, groups):
        return self.d.api("POST", "/v2.0/ports", {"port": {
            "name": name, "project_id": PROJECT, "network_id": self.net["id"],
            "binding:host_id": node.host, "device_owner": "compute:nova",
            "device_id": str(uuid.uuid4()),
            "security_groups": [g["id"] for g in groups]}})["port"]

    def update_port(self, port_id, **attrs):
        return self.d.api("PUT", f"/v2.0/ports/{port_id}", {"port": attrs})["port"]

    def boot(self, name, node, groups):
        """Creates the port (bound to NODE), plugs the VM, waits until Neutron says ACTIVE."""
        port = self.create_port(name, node, groups)
        vm = Vm(self.d, node, name, port)
        vm.plug()

        def active():
            p = self.d.api("GET", f"/v2.0/ports/{vm.id}")["port"]
            return p["status"] == "ACTIVE" and p

        p = self.d.wait_for(f"port {name} ACTIVE", active, 60,
                            node.name("neutron-openvswitch-agent"), interval=0.5)
        log(f"{name}: port {vm.id} {vm.ip} on {node.host} ACTIVE "
            f"(vif_type {p['binding:vif_type']}, "
            f"ovs_hybrid_plug {p['binding:vif_details'].get('ovs_hybrid_plug')})")
        return vm



class Scenario:
    """The operator's story, through Neutron's REST API only; every verdict is a packet."""

    def __init__(self, d, nodes):
        self.d = d
        self.nodes = nodes
        self.c = Cloud(d)
        self.steps = []

    def step(self, what, seconds=None):
        extra = f" ({seconds:.2f}s from the REST call's return to the verdict)" if seconds else ""
        log(f"STEP ok: {what}{extra}")
        self.steps.append(what)

    def check(self, src, dst, port, want):
        """One probe, long enough that a dropped SYN is not mistaken for a slow one."""
        got = src.probe(dst, port, 1000)
        if got != want:
            raise Failure(f"{src.name} -> {dst.name}:{port}: expected {want}, got {got}")

    def converge(self, src, dst, port, want, since, timeout=30):
        """Probes until SRC -> DST:PORT is WANT; returns the time since SINCE."""
        deadline = time.monotonic() + timeout
        while True:
            # The verdict was in place when the deciding probe's SYN left: at its start (the
            # probes never retransmit). Resolution: one probe, 100 ms or 300 ms.
            sent = time.monotonic()
            got = src.probe(dst, port, 100 if want == "allowed" else 300)
            if got == want:
                return sent - since
            if got not in ("allowed", "blocked"):
                raise Failure(f"{src.name} -> {dst.name}:{port}: probe error {got}")
            if time.monotonic() > deadline:
                raise Failure(
                    f"{src.name} -> {dst.name}:{port} still {got} {timeout}s after the change "
                    f"(expected {want}); logs in {self.d.logs}")

    def matrix(self):
        """The verdicts that must not depend on the firewall driver."""
        return {
            (src.name, dst.name, port): src.probe(dst, port, 1000)
            for src, dst, port in [
                (self.client1, self.web1, 80), (self.client2, self.web1, 80),
                (self.client1, self.web1, 22), (self.client2, self.web1, 22),
                (self.client1, self.web1, 8080), (self.web1, self.client1, 80),
                (self.client2, self.client1, 22), (self.web1, self.client2, 80),
            ]
        }

    def setup(self):
        c, (n1, n2) = self.c, self.nodes
        c.create_network()
        # Neutron gives every new group its two egress rules (IPv4, IPv6 to anywhere).
        self.base = c.create_group("base")
        self.web_servers = c.create_group("web_servers", [
            {"protocol": "tcp", "port_range_min": 80, "port_range_max": 80,
             "remote_ip_prefix": "0.0.0.0/0"}])
        self.admins = c.create_group("admins")
        self.web1 = web1 = c.boot("web1", n1, [self.base])
        self.client1 = c.boot("client1", n1, [self.base])
        self.client2 = c.boot("client2", n2, [self.base])
        web1.serve_echo(80)

    def run(self):
        c, (n1, n2) = self.c, self.nodes
        web1, client1, client2 = self.web1, self.client1, self.client2

        # 1. WEB1 is closed on port 80 until WEB_SERVERS is attached.
        self.check(client1, web1, 80, "blocked")
        self.check(client2, web1, 80, "blocked")
        self.step("web1:80 blocked from client1 (node1) and client2 (node2) with group base only")
        c.update_port(web1.id, security_groups=[self.base["id"], self.web_servers["id"]])
        t = time.monotonic()
        a = self.converge(client1, web1, 80, "allowed", t)
        b = self.converge(client2, web1, 80, "allowed", t)
        self.step("WEB_SERVERS attached to web1: web1:80 allowed from client1", a)
        self.step("... and from client2 on node2", b)
        self.check(client1, web1, 8080, "blocked")

        # 2. A rule added, then removed.
        rule = c.add_rule(self.web_servers, protocol="tcp", port_range_min=8080,
                          port_range_max=8080)
        self.step("rule tcp/8080 added to WEB_SERVERS: web1:8080 allowed",
                  self.converge(client1, web1, 8080, "allowed", time.monotonic()))
        c.delete_rule(rule)
        self.step("rule tcp/8080 deleted: web1:8080 blocked again",
                  self.converge(client1, web1, 8080, "blocked", time.monotonic()))

        # 3. Remote group: a port on node 2 joins ADMINS, which a rule on web1 (node 1) names.
        c.add_rule(self.web_servers, protocol="tcp", port_range_min=22, port_range_max=22,
                   remote_group_id=self.admins["id"])
        # Once node 1's sg agent holds the rule (its saved copy of what the driver pushed),
        # with ADMINS still empty, nothing may be let in.
        state = os.path.join(n1.sg_run, "neutron-state.json")

        def rule_on_node1():
            with open(state) as f:
                rules = json.load(f)["security_groups"].get(self.web_servers["id"], [])
            return any(r.get("remote_group_id") == self.admins["id"] for r in rules)

        self.d.wait_for("the remote-group rule in node 1's sg agent", rule_on_node1, 30,
                        n1.name("neutron-openvswitch-agent"))
        self.check(client2, web1, 22, "blocked")
        self.step("rule tcp/22 from remote group ADMINS on WEB_SERVERS; ADMINS empty: blocked")
        c.update_port(client2.id, security_groups=[self.base["id"], self.admins["id"]])
        self.step("client2 (node2) joins ADMINS: allowed in on web1:22 (node1)",
                  self.converge(client2, web1, 22, "allowed", time.monotonic()))
        self.check(client1, web1, 22, "blocked")
        self.step("client1, not in ADMINS, still blocked on web1:22")

        # 4. Port security disabled, then enabled.
        c.update_port(web1.id, port_security_enabled=False, security_groups=[])
        self.step("port security disabled on web1: web1:9999 allowed",
                  self.converge(client1, web1, 9999, "allowed", time.monotonic()))
        c.update_port(web1.id, port_security_enabled=True,
                      security_groups=[self.base["id"], self.web_servers["id"]])
        self.step("port security enabled again with its groups: web1:9999 blocked",
                  self.converge(client1, web1, 9999, "blocked", time.monotonic()))
        self.check(client1, web1, 80, "allowed")

        # 5. The sg agent on node 1 restarted during traffic.
        self.restart_sg_agent(n1)

        # 6. firewall_driver switched to iptables_hybrid and back, with the same verdicts.
        before = self.matrix()
        self.switch_driver(n1, "iptables_hybrid")
        with_iptables = self.matrix()
        self.switch_driver(n1, "sg_hybrid")
        back = self.matrix()
        if not before == with_iptables == back:
            raise Failure(f"verdicts differ: sg {before}, iptables_hybrid {with_iptables}, "
                          f"sg again {back}")
        table = ", ".join(f"{s}->{d}:{p} {v}" for (s, d, p), v in before.items())
        self.step(f"sg_hybrid, iptables_hybrid and sg_hybrid again give the same {len(before)} "
                  f"verdicts: {table}")

    def restart_sg_agent(self, node):
        d = self.d
        conn = d.start("client1-conn", [sys.executable, os.path.join(HERE, "conn.py"),
                                        self.web1.ip, "80"], ns=self.client1.ns, pipes=True)

        def say(what):
            conn.stdin.write(f"{what}\n")
            conn.stdin.flush()
            got = conn.stdout.readline().strip()
            if got != "ok":
                raise Failure(f"established connection client1 -> web1:80, {what}: {got or 'no answer'}")

        if conn.stdout.readline().strip() != "connected":
            d.check_alive("client1-conn")
            raise Failure("client1 could not connect to web1:80")
        say("before the restart")
        d.stop(node.name("sg-agent"))
        say("while the sg agent is down")
        self.check(self.client1, self.web1, 8080, "blocked")
        node.start_sg_agent()
        say("after the restart")
        self.check(self.client1, self.web1, 80, "allowed")
        self.check(self.client1, self.web1, 8080, "blocked")
        # The restarted agent must also still take changes from Neutron.
        rule = self.c.add_rule(self.web_servers, protocol="tcp", port_range_min=8080,
                               port_range_max=8080)
        self.converge(self.client1, self.web1, 8080, "allowed", time.monotonic())
        self.c.delete_rule(rule)
        self.converge(self.client1, self.web1, 8080, "blocked", time.monotonic())
        say("after a rule change through the restarted agent")
        d.stop("client1-conn")
        self.step("sg agent on node1 stopped and restarted: the established connection "
                  "client1 -> web1:80 carried data before, during and after; new verdicts "
                  "unchanged; a rule added and removed through the restarted agent took effect")

    def switch_driver(self, node, driver):
        """The README's switch-over and roll-back, on NODE."""
        d = self.d
        agent = node.name("neutron-openvswitch-agent")
        if driver == "iptables_hybrid":
            d.stop(agent)
            node.firewall_driver = driver
            node.start_ovs_agent()
            self.wait_resynced(node)
            self.wait_chains(node, present=True)
            # Then sg goes: stop its agent, detach everything it pinned.
            d.stop(node.name("sg-agent"))
            run(d.sg_bin, "--pin-root", node.pin_root, "--run-dir", node.sg_run, "detach",
                "--all")
        else:
            node.start_sg_agent()
            d.stop(agent)
            node.firewall_driver = driver
            node.start_ovs_agent()
            self.wait_resynced(node)
            with open(os.path.join(node.dir, "none.json"), "w") as f:
                f.write('{"ports": []}')
            ns_run(node.ns, d.sg_bin, "iptables", "apply", os.path.join(node.dir, "none.json"),
                   "--agent", "ovs-hybrid")
            self.wait_chains(node, present=False)
        log(f"{node.host}: firewall_driver = {driver}")

    def wait_resynced(self, node):
        """Until the restarted OVS agent has processed both ports of node 1 (web1, client1)."""
        d = self.d
        log_path = d.procs[node.name("neutron-openvswitch-agent")][1]
        mark = os.path.getsize(log_path)
        node.wait_agent_alive()

        def synced():
            with open(log_path, errors="replace") as f:
                f.seek(mark)
                added = [int(n) for n in re.findall(
                    r"rpc_loop - iteration:\d+ completed\. Processed ports statistics: "
                    r"\{'regular': \{'added': (\d+)", f.read())]
                return sum(added) >= 2 and all(
                    "ACTIVE" == d.api("GET", f"/v2.0/ports/{vm.id}")["port"]["status"]
                    for vm in (self.web1, self.client1))

        d.wait_for(f"{node.host}'s OVS agent resync", synced, 120,
                   node.name("neutron-openvswitch-agent"), interval=0.5)

    def wait_chains(self, node, present):
        def chains():
            out = ns_run(node.ns, "iptables-save")
            return ("neutron-openvswi-" in out) == present

        self.d.wait_for(f"{node.host}: neutron-openvswi-* chains {'present' if present else 'gone'}",
                        chains, 60, node.name("neutron-openvswitch-agent"), interval=0.5)



def percentile(xs, q):
    """The nearest-rank percentile: the smallest value with at least q% of them at or below."""
    xs = sorted(xs)
    return xs[max(0, math.ceil(q / 100 * len(xs)) - 1)]


def timings(sc, rounds, out_dir):
    """From each REST call's return to the new verdict on the wire, `rounds` times per kind of
    change and per firewall driver of node 1 (where every verdict is taken)."""
    c, d, (n1, _) = sc.c, sc.d, sc.nodes
    web1, client1, client2 = sc.web1, sc.client1, sc.client2
    c.update_port(web1.id, security_groups=[sc.base["id"], sc.web_servers["id"]])
    c.add_rule(sc.web_servers, protocol="tcp", port_range_min=22, port_range_max=22,
               remote_group_id=sc.admins["id"])
    sc.converge(client1, web1, 80, "allowed", time.monotonic())
    results = {}
    applies = []
    for driver in ("sg_hybrid", "iptables_hybrid"):
        if n1.firewall_driver != driver:
            # The sg agent's own share of the sg_hybrid figures: each driver call's apply.
            with open(d.procs[n1.name("sg-agent")][1], errors="replace") as f:
                applies = [int(x) / 1000 for x in re.findall(r"apply done elapsed_us=(\d+)",
                                                                f.read())]
            sc.switch_driver(n1, driver)
        add, delete, member = [], [], []
        for i in range(rounds):
            rule = c.add_rule(sc.web_servers, protocol="tcp", port_range_min=8080,
                              port_range_max=8080)
            add.append(sc.converge(client1, web1, 8080, "allowed", time.monotonic()))
            c.delete_rule(rule)
            delete.append(sc.converge(client1, web1, 8080, "blocked", time.monotonic()))
            c.update_port(client2.id, security_groups=[sc.base["id"], sc.admins["id"]])
            member.append(sc.converge(client2, web1, 22, "allowed", time.monotonic()))
            c.update_port(client2.id, security_groups=[sc.base["id"]])
            sc.converge(client2, web1, 22, "blocked", time.monotonic())
            if (i + 1) % 10 == 0:
                log(f"{driver}: {i + 1}/{rounds} rounds")
        results[driver] = {"rule add": add, "rule delete": delete,
                           "remote-group member add (node 2)": member}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "cloud.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = [
        "# Neutron to the wire: `cargo xtask cloud --timings`",
        "",
        f"From the REST call's return to the first probe that sees the new verdict, {rounds} "
        "changes of each kind per driver, in one deployment (tests/cloud/cloud.py: Neutron 29 "
        "API, RPC server and RabbitMQ, OVS agent with the driver below on node 1, where the "
        "verdicts are taken; node 2's agent keeps sg_hybrid). Probes are new TCP connections "
        "without retransmission (100 ms to see an allow, 300 ms to see a drop), so each figure "
        "is the start of the deciding probe: resolution one probe.",
        "",
        "| change | driver | p50 | p99 | min | max | ratio p50 sg/iptables |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in results["sg_hybrid"]:
        base = percentile(results["iptables_hybrid"][kind], 50)
        for driver in ("sg_hybrid", "iptables_hybrid"):
            xs = results[driver][kind]
            ratio = f"{percentile(xs, 50) / base:.2f}" if driver == "sg_hybrid" and base else ""
            lines.append(
                f"| {kind} | {driver} | {percentile(xs, 50) * 1000:.0f} ms | "
                f"{percentile(xs, 99) * 1000:.0f} ms | {min(xs) * 1000:.0f} ms | "
                f"{max(xs) * 1000:.0f} ms | {ratio} |")
    if applies:
        lines += [
            "",
            f"Of that, the sg agent's apply of each driver call on node 1 ({len(applies)} "
            f"applies, from its log): p50 {percentile(applies, 50):.1f} ms, "
            f"p99 {percentile(applies, 99):.1f} ms, max {max(applies):.1f} ms. The rest is "
            "Neutron's: the OVS agent refreshes firewalls in its rpc_loop "
            f"(`polling_interval = 2` s), for either driver. With {rounds} changes, p99 is "
            "the largest.",
        ]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "cloud.md"), "w") as f:
        f.write(text)
    print(text, flush=True)


def main():
    run_dir, sg_bin, site = sys.argv[1:4]
    rounds, out_dir = None, None
    if len(sys.argv) > 4:
        if sys.argv[4] != "--timings" or len(sys.argv) != 7:
            sys.exit(__doc__)
        rounds, out_dir = int(sys.argv[5]), os.path.abspath(sys.argv[6])
    if os.path.exists(run_dir):
        shutil.rmtree(run_dir)
    d = Deployment(run_dir, sg_bin, site)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    ok = False
    try:
        d.controller_network()
        d.start_mariadb()
        d.start_rabbitmq()
        d.start_neutron()
        log(f"controller up in {time.monotonic() - started:.0f}s")
        nodes = [Node(d, 1), Node(d, 2)]
        for n in nodes:
            n.network()
        run("ip", "link", "add", "data1", "type", "veth", "peer", "name", "data2")
        for n in nodes:
            run("ip", "link", "set", f"data{n.index}", "netns", n.ns, "name", "data")
        for n in nodes:
            n.start_ovs()
            if n.firewall_driver == "sg_hybrid":
                n.start_sg_agent()
            n.start_ovs_agent()
        for n in nodes:
            agent = n.wait_agent_alive()
            log(f"{n.host}: Open vSwitch agent alive: {agent[0]['configurations'].get('bridge_mappings')}")
        log(f"deployment up in {time.monotonic() - started:.0f}s")
        t = time.monotonic()
        sc = Scenario(d, nodes)
        sc.setup()
        if rounds:
            timings(sc, rounds, out_dir)
            log(f"timings: {rounds} rounds per driver in {time.monotonic() - t:.0f}s")
        else:
            sc.run()
            log(f"scenario: {len(sc.steps)} steps passed in {time.monotonic() - t:.0f}s")
        ok = True
    except Failure as e:
        log(f"FAILED: {e}")
        # For a person debugging: the deployment stays up this long (namespaces prefixed
        # {d.prefix}, the logs in place) before the teardown.
        pause = float(os.environ.get("SG_CLOUD_PAUSE_ON_FAILURE", "0"))
        if pause:
            log(f"pausing {pause:.0f}s before the teardown (SG_CLOUD_PAUSE_ON_FAILURE)")
            time.sleep(pause)
    except KeyboardInterrupt:
        log("interrupted")
    finally:
        d.teardown()
    log(f"{'passed' if ok else 'FAILED'} in {time.monotonic() - started:.0f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
