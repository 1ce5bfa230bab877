"""``POST /v1/feedback`` (lmforge extension): human judgement on a recorded answer.

The body names a response by the ``id`` the client got (``chatcmpl-…`` / ``cmpl-…``) and one of its choices
(``choice``, default 0), with a thumbs ``rating`` (``"up"`` / ``"down"``), an optional ``correction`` (the answer the
model should have given: the preferred answer of a DPO pair, the target of an SFT record), a ``comment`` and the
``annotator``.  It needs a server started with ``--record``; ``lmforge feedback export`` turns the feedback into
training data.  Bad bodies are 400s naming the field (unknown fields too, so a typo is never silently dropped).
"""

from __future__ import annotations

import time
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from lmforge.serve.openai.common import APIError, ServerContext


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    response_id: str = Field(min_length=1, max_length=200, description="The id of a recorded response.")
    choice: int = Field(0, ge=0, description="Which choice of the response (its index).")
    rating: Literal["up", "down"] = Field(description="Thumbs up or down.")
    correction: str | None = Field(None, min_length=1, max_length=100_000,
                                   description="The answer the model should have given (preferred answer).")
    comment: str | None = Field(None, max_length=10_000)
    annotator: str | None = Field(None, min_length=1, max_length=128, description="Who gave the feedback.")


class FeedbackResponse(BaseModel):
    id: str
    object: Literal["feedback"] = "feedback"
    response_id: str
    choice: int
    rating: str
    created: int


class FeedbackServing:
    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx

    def create(self, req: FeedbackRequest) -> FeedbackResponse:
        from lmforge.feedback.store import UnknownResponse

        recorder = self.ctx.recorder
        if recorder is None:
            raise APIError(400, "this server does not record responses, so feedback has nothing to attach to: start "
                                "it with `lmforge serve MODEL --record`", code="recording_off")
        try:
            row = recorder.add_feedback(req.response_id, req.choice, req.rating, req.correction, req.comment,
                                        req.annotator)
        except UnknownResponse:
            raise APIError(404, f"response_id: no recorded response {req.response_id!r} (only answers given while "
                                "this server records are kept)", param="response_id",
                           code="response_not_found") from None
        except IndexError as err:
            raise APIError(400, str(err), param="choice") from None
        return FeedbackResponse(id=f"fb-{row['id']}", response_id=req.response_id, choice=req.choice,
                                rating=req.rating, created=int(row["created"] or time.time()))


def router(serving: FeedbackServing) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/feedback")
    def feedback(req: FeedbackRequest) -> FeedbackResponse:  # a plain def: the SQLite write runs on the thread pool
        return serving.create(req)

    return r
