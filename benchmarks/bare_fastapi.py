"""The ceiling reference: a bare FastAPI POST endpoint with the same request and response shape.

benchmarks/throughput.py serves it with the same uvicorn settings as the leader, in
the same run, so our writes/s can be read as a fraction of what FastAPI itself does here.
"""

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

app = FastAPI()


class WriteRequest(BaseModel):
    key: str
    value: Any


@app.post("/keys")
async def write(body: WriteRequest) -> dict[str, Any]:
    return {"key": body.key, "value": body.value, "version": 1}


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
