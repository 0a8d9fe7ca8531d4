"""RFC 9457 problem details: one small exception hierarchy and one set of handlers.

Domain code raises a :class:`Problem` subclass; the handlers render every error —
ours, FastAPI's validation errors, Starlette's routing errors and unexpected
exceptions — as ``application/problem+json`` with a stable ``type``.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_BASE = "https://onecluster.dev/problems/"
log = logging.getLogger("onecluster.errors")


class ProblemDetails(BaseModel):
    """The body of every error response (RFC 9457)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(examples=[PROBLEM_BASE + "not-found"])
    title: str = Field(examples=["Not found"])
    status: int = Field(examples=[404])
    detail: str | None = Field(None, examples=["No cluster with this id."])
    instance: str | None = None


class Problem(Exception):
    """Base of every error the API answers on purpose."""

    status: int = 400
    slug: ClassVar[str] = "bad-request"
    title: ClassVar[str] = "Bad request"

    def __init__(
        self, detail: str | None = None, *, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra

    def body(self, instance: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": PROBLEM_BASE + self.slug,
            "title": self.title,
            "status": self.status,
        }
        if self.detail:
            out["detail"] = self.detail
        if instance:
            out["instance"] = instance
        out.update(self.extra)
        return out


class BadRequest(Problem):
    status, slug, title = 400, "bad-request", "Bad request"


class MalformedBody(Problem):
    status, slug, title = 400, "malformed-body", "Malformed request body"


class Unauthorized(Problem):
    status, slug, title = 401, "unauthorized", "Authentication required"

    def __init__(self, detail: str | None = None, *, error: str | None = "invalid_token") -> None:
        challenge = 'Bearer realm="onecluster"'
        if error:
            challenge += f', error="{error}"'
            if detail:
                challenge += f', error_description="{detail}"'
        super().__init__(detail, headers={"WWW-Authenticate": challenge})


class Forbidden(Problem):
    status, slug, title = 403, "forbidden", "Not allowed"


class InsufficientScope(Problem):
    status, slug, title = 403, "insufficient-scope", "Token lacks a required scope"


class NotFound(Problem):
    status, slug, title = 404, "not-found", "Not found"


class Conflict(Problem):
    status, slug, title = 409, "conflict", "Conflict"


class InvalidState(Problem):
    status, slug, title = 409, "invalid-state", "Not allowed in the current state"


class AlreadyExists(Problem):
    status, slug, title = 409, "already-exists", "Already exists"


class Gone(Problem):
    status, slug, title = 410, "gone", "No longer available"


class Unprocessable(Problem):
    status, slug, title = 422, "validation-failed", "Request validation failed"


class IdempotencyKeyReused(Problem):
    status, slug, title = 422, "idempotency-key-reused", "Idempotency-Key reused with another body"


class IdempotencyInProgress(Problem):
    status, slug, title = 409, "idempotency-in-progress", "A request with this key is running"


class IdempotentSecretWithheld(Problem):
    status, slug, title = 409, "idempotent-secret-withheld", "The first response is not replayed"


class RateLimited(Problem):
    status, slug, title = 429, "rate-limited", "Too many requests"

    def __init__(self, retry_after: int, detail: str | None = None) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, retry_after))})


_STATUS_TO_PROBLEM: dict[int, type[Problem]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    410: Gone,
    422: Unprocessable,
}


def problem_response(problem: Problem, request: Request | None = None) -> JSONResponse:
    instance = request.url.path if request is not None else None
    return JSONResponse(
        problem.body(instance),
        status_code=problem.status,
        headers=problem.headers,
        media_type=PROBLEM_MEDIA_TYPE,
    )


def _plain_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    out = []
    for err in exc.errors():
        out.append(
            {
                "loc": [str(p) for p in err.get("loc", ())],
                "msg": str(err.get("msg", "")),
                "type": str(err.get("type", "")),
            }
        )
    return out


def install_error_handlers(app: FastAPI) -> None:
    """Route every error of ``app`` through the problem+json renderer."""

    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Problem)
        return problem_response(exc, request)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = _plain_errors(exc)
        if any(e["type"] == "json_invalid" for e in errors):
            return problem_response(MalformedBody("The body is not valid JSON."), request)
        return problem_response(
            Unprocessable("The request does not match the schema.", errors=errors), request
        )

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        cls = _STATUS_TO_PROBLEM.get(exc.status_code)
        if exc.status_code == 405:
            problem: Problem = MethodNotAllowed(str(exc.detail))
        elif cls is Unauthorized:
            problem = Unauthorized(str(exc.detail))
        elif cls is not None:
            problem = cls(str(exc.detail) if exc.detail else None)
        else:
            problem = GenericHTTPProblem(exc.status_code, str(exc.detail))
        response = problem_response(problem, request)
        for key, value in (exc.headers or {}).items():
            response.headers[key] = value
        return response

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        response = problem_response(InternalError(), request)
        # This handler answers outside the telemetry middleware (Starlette's outermost
        # layer), so the ids that tie the 500 to its log lines are added here.
        state = request.scope.get("state") or {}
        for header, key in (("X-Request-ID", "request_id"), ("traceparent", "traceparent")):
            if state.get(key):
                response.headers[header] = state[key]
        return response

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)


class MethodNotAllowed(Problem):
    status, slug, title = 405, "method-not-allowed", "Method not allowed"


class InternalError(Problem):
    status, slug, title = 500, "internal", "Internal error"


class GenericHTTPProblem(Problem):
    slug, title = "http-error", "HTTP error"

    def __init__(self, status: int, detail: str | None = None) -> None:
        super().__init__(detail)
        self.status = status


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries declaring problem+json for the given statuses."""
    descriptions = {
        400: "Malformed request",
        401: "Missing, invalid or expired token",
        403: "Authenticated but not allowed",
        404: "Unknown id, or an object of another tenant",
        409: "Conflicts with the current state",
        410: "Expired or already used",
        422: "The payload does not match the schema",
        429: "Rate limit exceeded; see Retry-After",
    }
    return {
        s: {
            "description": descriptions.get(s, "Error"),
            "model": ProblemDetails,
            "content": {
                PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/ProblemDetails"}}
            },
        }
        for s in statuses
    }
