"""``agentd-agent``: ``attach`` goes to the session holder, anything else to the agent CLI.

The attach path must start fast (agentd runs it for every resume), so neither side is
imported before it is known which one runs: the agent CLI loads asyncio, the attach does not.
An agent named ``attach`` still runs as ``agentd-agent attach``, with no other argument.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 and args[0] == "attach":
        from agentd.agent.holder.attach import main as attach

        return attach(args[1:])
    from agentd.agent.cli import main as serve

    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
