"""The HTTP side of a write: the value's encoding checks, and the 200 or 503 that answers it."""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse, Response

from kv.core.records import Entry, encode_json
from kv.core.stats import WriteFailure
from kv.network.delivery import OVERFLOWED, Delivery, QuorumOutcome
from kv.web.errors import value_too_large
from kv.web.schemas import DeliveryReport, ErrorResponse, QuorumError

WRITE_RESPONSES: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorResponse, "description": "The value is larger than MAX_VALUE_BYTES."},
    503: {
        "model": QuorumError,
        "description": "Too few followers confirmed in time, or the leader is starting.",
    },
}


def encode_value(value: Any, max_bytes: int) -> str:
    """The value's JSON, once: 422 for NaN and infinities, 413 past MAX_VALUE_BYTES."""
    try:
        value_json = encode_json(value)
    except ValueError:
        raise HTTPException(422, "value must be plain JSON: NaN and Infinity are not") from None
    if (size := len(value_json.encode())) > max_bytes:
        raise value_too_large(size, max_bytes)
    return value_json


def check_quorum(w: int | None, followers: int) -> None:
    if w is not None and w > followers:
        raise HTTPException(422, f"w: must be between 0 and {followers} (the number of followers)")


def delivery_report(delivery: Delivery) -> dict[str, Any]:
    report: dict[str, Any] = {
        "follower": delivery.follower,
        "ok": delivery.ok,
        "delay_ms": delivery.delay_ms,
        "latency_ms": delivery.latency_ms,
        "attempts": delivery.attempts,
    }
    if delivery.error is not None:
        report["error"] = delivery.error
    return report


def why_missed(outcome: QuorumOutcome, reachable: int) -> WriteFailure | None:
    """Why the quorum was missed, or None if it was reached."""
    if outcome.reached:
        return None
    if any(d.error == OVERFLOWED for d in outcome.deliveries):
        return WriteFailure.OVERFLOW
    if reachable < outcome.required:
        return WriteFailure.UNREACHABLE
    return WriteFailure.NOT_IN_TIME


def write_response(
    entry: Entry,
    outcome: QuorumOutcome,
    *,
    term: int,
    latency_s: float,
    failure: WriteFailure | None,
    reachable: int,
    followers: int,
    max_queue: int,
) -> Response:
    """200 with the write and its deliveries, or 503 saying why the quorum was missed."""
    latency_ms = round(latency_s * 1000, 3)
    reports = [delivery_report(d) for d in outcome.deliveries]
    if failure is not None:
        if failure is WriteFailure.OVERFLOW:
            overflowed = sum(1 for d in outcome.deliveries if d.error == OVERFLOWED)
            why = (
                f"{overflowed} follower(s) had failed to take MAX_REPLICATION_QUEUE={max_queue} "
                "entries, so their queue was replaced by a snapshot resync"
            )
        elif failure is WriteFailure.UNREACHABLE:
            why = f"only {reachable} of {followers} followers are reachable"
        else:
            why = "not in time"
        message = (
            f"write quorum not reached: {outcome.acks} of {outcome.required} required "
            f"follower(s) confirmed ({why}); the write is applied on the leader as version "
            f"{entry.version} and replication to the rest continues in the background"
        )
        body = QuorumError(
            error=message,
            key=entry.key,
            version=entry.version,
            term=term,
            acks=outcome.acks,
            write_quorum=outcome.required,
            latency_ms=latency_ms,
            replication=[DeliveryReport(**report) for report in reports],
        )
        return JSONResponse(body.model_dump(), status_code=503)
    # A WriteResponse, built by hand on the hot path: the entry's cached JSON already
    # holds key, value, version and deleted, so the value is not encoded a second time.
    rest = {
        "term": term,
        "acks": outcome.acks,
        "write_quorum": outcome.required,
        "latency_ms": latency_ms,
        "replication": reports,
    }
    return Response(
        entry.encoded[:-1] + b"," + encode_json(rest)[1:].encode(), media_type="application/json"
    )
