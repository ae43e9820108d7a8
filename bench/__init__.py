"""The benchmark suite: agentd side by side with websocketd and OpenSSH (docs/performance.md)."""
