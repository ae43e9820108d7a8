"""The SSH transport: agents on project VMs, over pooled SSH connections with strict host keys.

``transport`` is the ``AgentTransport`` sessions use; it keeps one ``pool`` of connections
per VM. Each ``connection`` is Conch's SSH client with agentd's ``known_hosts`` check and key
auth, and carries agents as exec ``channel``s. ``settings`` is what all of them are given.
"""
