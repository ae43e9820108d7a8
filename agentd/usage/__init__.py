"""Usage metering: every finished query recorded exactly once, summed per day, read as bills."""

from agentd.usage.recorder import *  # noqa: F403
