"""sg_neutron: a Neutron ``firewall_driver`` that carries Neutron's calls to the sg agent.

``firewall_driver = sg`` (the device is the tap) or ``sg_hybrid`` (the OVS agent with hybrid
plugging: the tap is ``tap`` + the port id's first 11 characters). The sg agent
(``sg agent --api-socket PATH``) validates, applies and enforces; see PROTOCOL.md.
"""

from sg_neutron.client import AgentClient, AgentError, AgentUnreachable  # noqa: F401

__version__ = "0.1.0"
