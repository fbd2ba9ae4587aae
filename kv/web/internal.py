"""The HTTP side of the follower's internal routes: documentation and bodies for /replicate."""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.responses import JSONResponse

from kv.core.records import Entry
from kv.core.requests import RequestTag
from kv.follower.node import Applied, Page, Refused, TermUnknown
from kv.follower.service import FollowerService
from kv.web.auth import SECRET_HEADER
from kv.web.schemas import (
    PAGE_LINES,
    ErrorResponse,
    FollowerEntries,
    ReplicateRequest,
    ReplicateResponse,
    TermConflict,
)

PAGE_LIMIT_DEFAULT = 10_000
PAGE_LIMIT_MAX = 100_000

# The header is checked by RequireSecret before routing; this documents it in /docs.
SECRET_PARAMETER = {
    "name": SECRET_HEADER,
    "in": "header",
    "required": True,
    "schema": {"type": "string"},
    "description": "REPLICATION_SECRET, shared by the leader and followers.",
}
UNAUTHORISED: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or wrong secret."}
}
TERM_UNKNOWN: dict[int | str, dict[str, Any]] = {
    503: {
        "model": ErrorResponse,
        "description": "An HA follower restarted without DATA_DIR has not yet learnt the "
        "current term from etcd; the leader retries.",
    }
}
REPLICATE_RESPONSES: dict[int | str, dict[str, Any]] = {
    **UNAUTHORISED,
    409: {"model": TermConflict, "description": "The batch comes from an older term."},
    **TERM_UNKNOWN,
}
ENTRIES_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A page of entries: FollowerEntries as JSON, or with `format=lines` its "
        "other fields as JSON on the first line and then one entry per line.",
        "content": {PAGE_LINES: {"schema": {"type": "string"}}},
    },
    **UNAUTHORISED,
    409: {"model": TermConflict, "description": "The reader's term is older."},
    **TERM_UNKNOWN,
}
REJECTED_WRITE: dict[int | str, dict[str, Any]] = {
    403: {"model": ErrorResponse, "description": "Followers accept no writes (fixed leader)."},
    307: {"model": ErrorResponse, "description": "HA: the same request, to the leader."},
    503: {"model": ErrorResponse, "description": "HA: no leader is known; retry shortly."},
}


def entries_of(body: ReplicateRequest) -> list[Entry]:
    return [
        Entry(
            e.key,
            e.value,
            e.version,
            e.deleted,
            request=None if e.request is None else RequestTag(e.request.id, e.request.digest),
        )
        for e in body.entries
    ]


def refused(refusal: Refused) -> JSONResponse:
    conflict = TermConflict(
        error=refusal.reason, follower_term=refusal.follower_term, batch_term=refusal.batch_term
    )
    return JSONResponse(conflict.model_dump(), status_code=409)


def term_unknown(outcome: TermUnknown) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=outcome.reason).model_dump(), status_code=503)


def confirmation(outcome: Applied, last_version: int, term: int, node_id: str) -> Response:
    body = ReplicateResponse(
        applied=len(outcome.applied),
        stale=outcome.stale,
        last_version=last_version,
        term=term,
        node_id=node_id,
        unconfirmed=outcome.unconfirmed,
    )
    # Serialised directly: the model is already valid, so FastAPI need not check it again.
    return Response(body.model_dump_json(), media_type="application/json")


def page_body(
    page: Page, last_version: int, term: int, node_id: str, lines: bool = False
) -> Response:
    """A FollowerEntries body, joined from each entry's cached JSON: a page can hold a hundred
    thousand entries, and none of them is encoded again.

    `lines`: the same fields but `entries` on the first line, then each entry on a line of
    its own (JSON never holds a raw newline), so that a reader can take each entry's bytes
    as they are instead of decoding every value and encoding it again."""
    rest = FollowerEntries.model_construct(
        entries=[],
        last_version=last_version,
        term=term,
        node_id=node_id,
        next_after=page.next_after,
    ).model_dump_json()
    fields = rest.encode()[len('{"entries":[],') :]
    if lines:
        entries = b"".join(b"\n" + e.wire for e in page.entries)
        return Response(b"{" + fields + entries, media_type=PAGE_LINES)
    entries = b",".join(e.wire for e in page.entries)
    return Response(b'{"entries":[' + entries + b"]," + fields, media_type="application/json")


def write_elsewhere(request: Request, node: FollowerService) -> Response:
    """A write sent to a follower. Fixed leader: 403 naming LEADER_URL. Elected leader (HA):
    307 to the same path and query on the leader, which `curl -L` and httpx's
    `follow_redirects=True` follow; 503 with Retry-After while no leader is known."""
    if node.election is None:
        raise write_refused(node.settings.leader_url)
    leader = node.election.leader_url
    if leader is None:
        return JSONResponse(
            {"error": node.election.no_leader_reason(), "detail": None},
            status_code=503,
            headers={"Retry-After": "1"},
        )
    scope = request.scope
    path = scope.get("raw_path") or scope["path"].encode()
    query = scope.get("query_string", b"")
    location = leader + path.decode("latin-1") + (f"?{query.decode('latin-1')}" if query else "")
    return JSONResponse(
        {"error": f"this node is a follower; writes go to the leader at {leader}", "detail": None},
        status_code=307,
        headers={"Location": location},
    )


def write_refused(leader_url: str | None) -> HTTPException:
    where = (
        f"the leader at LEADER_URL={leader_url}"
        if leader_url
        else "the leader (LEADER_URL is not set on this follower)"
    )
    return HTTPException(
        403, f"this node is a follower and accepts no writes; send writes to {where}"
    )
