"""``python -m agentd.agent.holder``: the session holder process, as attach.py starts it."""

import sys

from agentd.agent.holder.process import main

sys.exit(main())
