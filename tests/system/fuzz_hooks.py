"""Schemathesis hooks for tests/test_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

A write given a timeout of a few microseconds rightly answers 503 (the quorum was
not reached in time): documented behaviour, not a crash. The fuzz is there to find
crashes and schema violations, so generated timeouts get a floor of one second.
"""

import schemathesis


@schemathesis.hook
def map_query(ctx, query):
    if isinstance(query, dict) and isinstance(query.get("timeout_ms"), int | float):
        query["timeout_ms"] = max(query["timeout_ms"], 1000)
    return query
