"""agentd: a production gateway between browsers and AI coding agents on project VMs."""

__version__ = "0.1.0"
