"""The session holder: keeps an agent and its numbered lines on the VM, whoever attaches.

``agentd-agent attach`` (attach.py) connects to the session's holder (holder.py, its process
in process.py), starting it when there is none (spawn.py); the holder runs the agent CLI
(child.py), numbers and journals its lines (ledger.py, journal.py, state.py) and serves its
attaches (connections.py), in the session's private directory (sessions.py). wire.py has
the lines between them, names.py the patterns every name is checked with.
"""
