"""Provider API keys for agent processes: the operator's, and users' own sealed at rest.

``sealing`` is the cryptography an auditor reads (``cryptography`` only, no Twisted);
``records`` keeps sealed records in Redis or in memory; ``store`` is the policy over both;
``source`` is the seam sessions depend on; ``api`` is the HTTP API through which users manage
their keys; ``cli`` is ``agentd keys``.
"""
