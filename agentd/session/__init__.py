"""Sessions: one live agent conversation per (project, user, agent), and the seams it uses.

One module per job; callers import from the module that owns a name:

    session        Session: seq numbers, attach/detach, grace, prompts, the agent's output
    replay         the bounded replay log and the seq envelope of the frames it keeps
    registry       SessionRegistry: every live session of this process, and its shutdown
    services       what a session needs from the rest of agentd, as typed seams
    gate           the prompt gate agentd wires: the prompt rate limit, then the budgets
"""
