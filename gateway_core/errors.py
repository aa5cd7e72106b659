"""Domain errors: each carries a stable code and the HTTP status a client sees."""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    """Base of every error a client may see; mapped once to the error envelope."""

    code = "INTERNAL_ERROR"
    status = 500

    def __init__(self, message: str, *, details: dict[str, Any] | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}
        if code is not None:
            self.code = code


class InvalidRequestError(GatewayError):
    code = "INVALID_REQUEST"
    status = 400


class ValidationFailedError(GatewayError):
    code = "VALIDATION_FAILED"
    status = 422


class AuthenticationError(GatewayError):
    code = "UNAUTHENTICATED"
    status = 401


class NotFoundError(GatewayError):
    code = "NOT_FOUND"
    status = 404


class UnknownServiceError(NotFoundError):
    code = "UNKNOWN_SERVICE"


class ServiceDisabledError(GatewayError):
    code = "SERVICE_DISABLED"
    status = 503


class UnsupportedMediaTypeError(GatewayError):
    code = "UNSUPPORTED_MEDIA_TYPE"
    status = 415


class PayloadTooLargeError(GatewayError):
    code = "PAYLOAD_TOO_LARGE"
    status = 413


class IllegalTransitionError(GatewayError):
    """A job was asked to move to a state its current state may not reach."""

    code = "ILLEGAL_TRANSITION"
    status = 409


class ConfigError(Exception):
    """gateway.yaml or the environment holds a bad key or value; raised at start."""


class ConcurrencyLimitError(GatewayError):
    code = "CONCURRENCY_LIMIT"
    status = 429


class QuotaExceededError(GatewayError):
    code = "QUOTA_EXCEEDED"
    status = 429


class IdempotencyKeyReusedError(GatewayError):
    code = "IDEMPOTENCY_KEY_REUSED"
    status = 422


class IdempotencyInProgressError(GatewayError):
    code = "IDEMPOTENCY_IN_PROGRESS"
    status = 409


class JobFinishedError(GatewayError):
    code = "JOB_FINISHED"
    status = 409


class NotRetriableError(GatewayError):
    code = "NOT_RETRIABLE"
    status = 409


class ForbiddenError(GatewayError):
    code = "FORBIDDEN"
    status = 403


class LedgerBelowZeroError(GatewayError):
    """A ledger movement would take a tenant's balance or reserved credits below zero: refused whole."""

    code = "BALANCE_BELOW_ZERO"
    status = 409
