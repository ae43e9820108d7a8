"""The SSH transport: agents on project VMs, over pooled SSH connections with strict host keys."""
