"""Schemathesis hooks for tests/test_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

A write given a timeout of a few microseconds rightly answers 503 (the quorum was
not reached in time): documented behaviour, not a crash. The fuzz is there to find
crashes and schema violations, so generated timeouts get a floor of one second, and
generated min_version 0: a version this node has not applied rightly answers 503 too
(documented, and tested in test_integration.py), while the fuzz still reaches the parameters.
"""

import schemathesis


@schemathesis.hook
def map_query(ctx, query):
    if isinstance(query, dict) and isinstance(query.get("timeout_ms"), int | float):
        query["timeout_ms"] = max(query["timeout_ms"], 1000)
    if isinstance(query, dict) and "min_version" in query:
        query["min_version"] = 0
    return query


@schemathesis.hook
def map_headers(ctx, headers):
    if isinstance(headers, dict):
        for name in list(headers):
            if name.lower() == "x-min-version":
                headers[name] = "0"
    return headers
