"""Print str(os_ken.lib.packet.packet.Packet(frame)) for each hex frame on stdin, one per line:
the `pkt=` field of Neutron's OVS log driver (ovs_firewall_log.py, packet_in_handler)."""
import binascii
import sys

from os_ken.lib.packet import packet

for line in sys.stdin:
    line = line.strip()
    if line:
        print(str(packet.Packet(binascii.unhexlify(line))))
