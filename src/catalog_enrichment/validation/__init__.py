"""The products contract as row-level rules (``rules``: quarantine, circuit breaker) and as a Great
Expectations suite (``suite``: the report)."""
