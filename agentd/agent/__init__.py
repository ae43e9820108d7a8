"""The VM-side agent CLI: one agent conversation over JSON lines on stdin and stdout."""
