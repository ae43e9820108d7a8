"""The names an attach carries, checked with the patterns agentd checks them with.

The patterns are copies of ``agentd.config``'s and ``agentd.gateway``'s: importing those
modules would load agentd's configuration code on every attach, which must start fast.
``tests/test_holder.py`` checks that the copies stay identical.
"""

from __future__ import annotations

import re

PROJECT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
AGENT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127}$")
SESSION_ID_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
LAST_SEQ_RE = re.compile(r"[0-9]{1,16}")
MAX_SEQ = 2**53


def seq_from_text(text: str) -> int | None:
    """``text`` as a seq (ASCII digits, at most MAX_SEQ), or None."""
    if not LAST_SEQ_RE.fullmatch(text):
        return None
    value = int(text)
    return value if value <= MAX_SEQ else None
