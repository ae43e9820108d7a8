"""Usage metering: every finished query recorded exactly once, summed per day, read as bills.

One module per job; callers import from the module that owns a name:

    records        the agent's usage object, validated and priced: UsageEvent, UsageRecord
    layout         UTC days and months, the Redis key of every counter, expiry
    store          the UsageStore interface; redis_store and memory_store implement it
    spool          records Redis has not confirmed, in an fsynced append-only file
    reports        a user's or a project's month, as JSON or CSV
    budgets        may a prompt go ahead, given the month's operator-paid spend
    recorder       UsageRecorder: recording and the spool's replay; asked for budgets, reports
    api            /api/usage
    cli            ``agentd usage``

docs/usage.md describes the key layout, retention, prices, budgets, the spool and the API.
"""
