"""Provider API keys for agent processes: the operator's, and users' own sealed at rest."""
