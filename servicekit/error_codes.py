"""The one registry of error codes: each code a caller can be answered, with
its gRPC status (and so its HTTP status) and a one-line meaning.

`DomainError` accepts only a code registered here with its status (tests run
strict: an unregistered code fails the test that reaches it; production logs
it and answers anyway). docs/errors.md is this table, rendered by
`python -m servicekit.error_codes`; tests/unit/test_error_codes.py holds the
docs, the registry and the codes the source raises against one another.

A few codes answer under two statuses for historical reasons (e.g.
STORE_MISMATCH: a refused order in an upload, a key used for another store);
they are listed with both, so a caller knows either can come.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import grpc

log = logging.getLogger(__name__)

_S = grpc.StatusCode

# gRPC status -> HTTP status (the gateway's mapping; gateway/errors.py). A
# status not listed is a 500 "internal error".
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    _S.INVALID_ARGUMENT: 422,
    _S.OUT_OF_RANGE: 422,
    _S.NOT_FOUND: 404,
    _S.ALREADY_EXISTS: 409,
    _S.ABORTED: 409,
    _S.FAILED_PRECONDITION: 409,
    _S.PERMISSION_DENIED: 403,
    _S.UNAUTHENTICATED: 401,
    _S.RESOURCE_EXHAUSTED: 429,
    _S.UNAVAILABLE: 503,
    _S.DEADLINE_EXCEEDED: 504,
}


@dataclass(frozen=True)
class ErrorCode:
    code: str
    meaning: str
    # Empty for the gateway's HTTP-only refusals (body too large, unknown method).
    statuses: tuple[grpc.StatusCode, ...]
    http_only: int | None = None

    @property
    def http_statuses(self) -> tuple[int, ...]:
        if self.http_only is not None:
            return (self.http_only,)
        return tuple(sorted({HTTP_STATUS.get(s, 500) for s in self.statuses}))


def _c(code: str, meaning: str, *statuses: grpc.StatusCode) -> ErrorCode:
    return ErrorCode(code, meaning, statuses)


def _http(code: str, http: int | None, meaning: str) -> ErrorCode:
    # None: the HTTP status of the refusal itself (another 4xx of the framework).
    return ErrorCode(code, meaning, (), http_only=http or 0)


ERROR_CODES: dict[str, ErrorCode] = {
    e.code: e
    for e in (
        _c("ACCESSOR_REQUIRED", "accessor is required", _S.INVALID_ARGUMENT),
        _c("RANGE_TOO_LONG", "a dashboard range longer than … days", _S.INVALID_ARGUMENT),
        _c(
            "INVALID_USERNAME",
            "username: 1 to 64 letters, digits, '_', '.', '@', '-'",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "PASSWORD_TOO_SHORT",
            "the new password needs at least … characters",
            _S.INVALID_ARGUMENT,
        ),
        _c("OPERATOR_EXISTS", "a console operator of this name exists", _S.ALREADY_EXISTS),
        _c("OPERATOR_NOT_FOUND", "no console operator of this name", _S.NOT_FOUND),
        _c(
            "INVALID_FORM",
            "a console form's amounts or counts are not valid (yuan: at most two decimals)",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "INVALID_ACTOR",
            "by: who runs a console users command, 1 to 128 characters",
            _S.INVALID_ARGUMENT,
        ),
        _c("UNKNOWN_REGION", "no store in region …", _S.NOT_FOUND),
        _c(
            "INVALID_DEAD_LETTER_REF",
            "stream, group or id of a dead letter is malformed",
            _S.INVALID_ARGUMENT,
        ),
        _c("INVALID_AHEAD", "ahead must be 0 or more months", _S.INVALID_ARGUMENT),
        _c("UNKNOWN_PARTITION", "… is not a partition of …", _S.NOT_FOUND),
        _c(
            "PARTITION_HAS_OPEN_SENDS",
            "the partition still holds sends pending, sending or unknown",
            _S.FAILED_PRECONDITION,
        ),
        _c(
            "PARTITION_IN_TIER_WINDOW",
            "a tier programme's window still reads the partition's orders",
            _S.FAILED_PRECONDITION,
        ),
        _c(
            "PARTITION_IS_DEFAULT",
            "the default partition catches strays and is never detached",
            _S.FAILED_PRECONDITION,
        ),
        _c(
            "PARTITION_NEEDED_BY_AUDIT",
            "the ledger audit still reads the partition: no balance checkpoint covers it",
            _S.FAILED_PRECONDITION,
        ),
        _c(
            "PARTITION_NEEDED_BY_REFUNDS",
            "a refund still reads the lots partition: a journal partition before its end is"
            " attached",
            _S.FAILED_PRECONDITION,
        ),
        _c(
            "PARTITION_HAS_LIVE_LOTS",
            "a lot in the partition still holds points (or a refund's clawback)",
            _S.FAILED_PRECONDITION,
        ),
        _c(
            "CHECKPOINT_NOT_MONTH_BOUNDARY",
            "a balance checkpoint is taken at the first instant of a month (UTC)",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "CHECKPOINT_IN_FUTURE",
            "a balance checkpoint cannot cover a month boundary not yet reached",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "CHECKPOINT_EXISTS",
            "the ledger is already checkpointed at or after that month boundary",
            _S.FAILED_PRECONDITION,
        ),
        _c(
            "CHECKPOINT_OPEN_TRANSACTIONS",
            "a transaction started before the boundary is still open: retry later",
            _S.FAILED_PRECONDITION,
        ),
        _c(
            "CHECKPOINT_AUDIT_FAILED",
            "the ledger audit found drift: no checkpoint is written over it",
            _S.FAILED_PRECONDITION,
        ),
        _c(
            "AUDIT_JOURNAL_ARCHIVED",
            "a full audit needs every journal partition; some are archived",
            _S.FAILED_PRECONDITION,
        ),
        _c(
            "REFUND_JOURNAL_ARCHIVED",
            "the order's journal rows are archived: it is past the refund horizon",
            _S.FAILED_PRECONDITION,
        ),
        _c(
            "PARTITION_HAS_LIVE_COUPONS",
            "coupons in the partition are still available or locked: run the expiry job first",
            _S.FAILED_PRECONDITION,
        ),
        _c(
            "REFUND_ORDER_ARCHIVED",
            "the order's partition is archived: it is past the refund horizon",
            _S.FAILED_PRECONDITION,
        ),
        _c(
            "PARTITION_TOO_RECENT",
            "the partition ends inside the months the table keeps",
            _S.FAILED_PRECONDITION,
        ),
        _c("BAD_CALLBACK_TOKEN", "the delivery-report token is wrong", _S.PERMISSION_DENIED),
        _c("INVALID_RECEIPT", "a delivery report needs out_id and biz_id", _S.INVALID_ARGUMENT),
        _c(
            "INVALID_TEMPLATE_VALUE",
            "a journey's template value is not a string",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "UNKNOWN_TEMPLATE_VARIABLE",
            "a journey's template names an unknown variable",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "TEMPLATE_FIELD_TYPE",
            "a template value cannot fill the provider field's type (thing, number, date...)",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "TEMPLATE_VALUE_TOO_LONG",
            "a template value can exceed the provider field's length for some member",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "MISSING_TEMPLATE_DATA",
            "a send step's content lacks a field its channel needs",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "UNKNOWN_KEYWORD_TYPE",
            "a WeChat subscribe-message keyword of an unknown type",
            _S.INVALID_ARGUMENT,
        ),
        _c("INVALID_SIGN_NAME", "sign_name: up to 12 characters", _S.INVALID_ARGUMENT),
        _c(
            "UNSUPPLIED_VARIABLE",
            "a send step's template names a variable its journey's entry event never supplies",
            _S.INVALID_ARGUMENT,
        ),
        _c("ACTION_CAP_REACHED", "… earns at most … time(s) per …", _S.FAILED_PRECONDITION),
        _c("ACTOR_REQUIRED", "actor is required", _S.INVALID_ARGUMENT),
        _c(
            "ADDRESS_NOT_PRINTABLE",
            "address contains control characters (e.g. a NUL byte)",
            _S.INVALID_ARGUMENT,
        ),
        _c("ADDRESS_REQUIRED", "address is required", _S.INVALID_ARGUMENT),
        _c("ADDRESS_TOO_LONG", "address is longer than its limit", _S.INVALID_ARGUMENT),
        _c("ALREADY_EXISTS", "it exists already", _S.ALREADY_EXISTS),
        _c("ALREADY_MERGED", "these members are already one member", _S.FAILED_PRECONDITION),
        _c("ALREADY_REFERRED", "member … already accepted another member's invite", _S.ABORTED),
        _c("ALREADY_SHIPPED", "mall exchange … already shipped with … …", _S.ABORTED),
        _c("AMOUNT_TOO_LARGE", "a coupon amount exceeds its limit", _S.INVALID_ARGUMENT),
        _c(
            "APP_IDS_FOR_MINIPROGRAM_ONLY",
            "only a miniprogram_backend client is bound to apps",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "APP_IDS_REQUIRED",
            "a miniprogram_backend client needs --app-id (repeatable): the WeChat apps whose openids it may assert",
            _S.INVALID_ARGUMENT,
        ),
        _c("APP_NOT_BOUND", "client … is not registered for app …", _S.PERMISSION_DENIED),
        _c(
            "AUTH_FAILURES_LIMITED",
            "too many failed sign-ins from this address; retry later",
            _S.RESOURCE_EXHAUSTED,
        ),
        _c("BAD_SIGNATURE", "the callback signature does not match", _S.PERMISSION_DENIED),
        _c("BATCH_TOO_LARGE", "items holds … members; at most … per call", _S.INVALID_ARGUMENT),
        _c(
            "BELOW_THRESHOLD",
            "the cart is below the coupon's threshold of eligible items",
            _S.FAILED_PRECONDITION,
        ),
        _http("BODY_TOO_LARGE", 413, "the request body is larger than HTTP_MAX_BODY_BYTES"),
        _c(
            "BUDGET_BELOW_USED",
            "the budget would be below what is already used",
            _S.FAILED_PRECONDITION,
        ),
        _c("BUDGET_EXHAUSTED", "no coupon budget left this month for the …", _S.RESOURCE_EXHAUSTED),
        _c("CALLBACK_TOO_LARGE", "the callback body is too large", _S.INVALID_ARGUMENT),
        _c(
            "CALLBACK_TOO_OLD",
            "the callback is older than … s (or from the future)",
            _S.INVALID_ARGUMENT,
        ),
        _c("CARRIER_REQUIRED", "carrier is required", _S.INVALID_ARGUMENT),
        _c("CART_EMPTY", "a cart needs at least one line", _S.INVALID_ARGUMENT),
        _c(
            "CART_TOTAL_MISMATCH",
            "lines add up to … fen but gross_amount_fen is …",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "CERTIFICATE_STORE_MISMATCH",
            "the client certificate is not for store …",
            _S.PERMISSION_DENIED,
        ),
        _c(
            "CHANNEL_NOT_ELIGIBLE",
            "the coupon is not valid for orders of this channel",
            _S.FAILED_PRECONDITION,
        ),
        _c("CHANNEL_REQUIRED", "channel is required", _S.INVALID_ARGUMENT),
        _c(
            "CITY_NOT_PRINTABLE",
            "city contains control characters (e.g. a NUL byte)",
            _S.INVALID_ARGUMENT,
        ),
        _c("CITY_REQUIRED", "city is required", _S.INVALID_ARGUMENT),
        _c("CITY_TOO_LONG", "city is longer than its limit", _S.INVALID_ARGUMENT),
        _c("CLIENT_EXISTS", "client … exists", _S.ALREADY_EXISTS),
        _c("CLIENT_REVOKED", "client … was revoked", _S.ALREADY_EXISTS),
        _c(
            "CODE_OR_PHONE_REQUIRED",
            "give exactly one of code (WeChat's phone code) or phone (unverified)",
            _S.INVALID_ARGUMENT,
        ),
        _c("CONCURRENT_SETTLEMENT", "the order was being settled concurrently; retry", _S.ABORTED),
        _c("CONFLICT", "the request contradicts state", _S.ABORTED),
        _c(
            "COUPON_ARCHIVED",
            "the coupon under the issue key expired long ago and was archived",
            _S.FAILED_PRECONDITION,
        ),
        _c(
            "COUPON_ALREADY_USED", "the coupon was used already", _S.ABORTED, _S.FAILED_PRECONDITION
        ),
        _c("COUPON_CODE_REQUIRED", "code is required", _S.INVALID_ARGUMENT),
        _c("COUPON_EXPIRED", "the coupon is past its validity", _S.FAILED_PRECONDITION),
        _c(
            "COUPON_LOCKED",
            "the coupon is locked at a till for another order",
            _S.ABORTED,
            _S.FAILED_PRECONDITION,
        ),
        _c(
            "COUPON_NEEDS_LINES",
            "an order with coupons needs its lines (the discount is computed on them)",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "COUPON_NOT_REVOCABLE",
            "the exchange's coupon is …: it cannot be taken back",
            _S.FAILED_PRECONDITION,
        ),
        _c("COUPON_NOT_YET_VALID", "the coupon's validity has not begun", _S.FAILED_PRECONDITION),
        _c("COUPON_REFUSED", "rewards refused the coupon: …", _S.FAILED_PRECONDITION),
        _c("COUPON_TEMPLATE_ID_REQUIRED", "coupon_template_id is required", _S.INVALID_ARGUMENT),
        _c(
            "COUPON_TEMPLATE_NOT_ALLOWED",
            "a goods item has no coupon template",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "CREDENTIALS_MISSING",
            "sign the request: X-Key-Id, X-Timestamp, X-Nonce and X-Signature are required",
            _S.UNAUTHENTICATED,
        ),
        _c("CYCLE_WITHOUT_WAIT", "a journey's steps loop without a wait", _S.INVALID_ARGUMENT),
        _c(
            "DAILY_BUDGET_EXHAUSTED",
            "coupon template … issued its … coupons for today",
            _S.FAILED_PRECONDITION,
        ),
        _c(
            "DEPENDENCY_UNAVAILABLE",
            "a backing service, PostgreSQL or Redis did not answer; retry with the same key",
            _S.UNAVAILABLE,
        ),
        _c(
            "DIRECTORY_EMPTY",
            "WeCom's directory came back empty; check the app's directory permission",
            _S.FAILED_PRECONDITION,
        ),
        _c(
            "DISCOUNT_ABOVE_THRESHOLD",
            "a coupon's discount exceeds its threshold",
            _S.INVALID_ARGUMENT,
        ),
        _c("DUPLICATE_COUPON_CODE", "the field names a coupon twice", _S.INVALID_ARGUMENT),
        _c(
            "DUPLICATE_ISSUE_KEY",
            "items[…].issue_key repeats items[…].issue_key; each coupon needs its own key",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "DUPLICATE_IDEMPOTENCY_KEY",
            "lines[…].idempotency_key repeats an earlier line's key; each earn needs its own",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "EARN_ALREADY_EXPIRED",
            "points earned at occurred_at would already have expired (a bulk earn line)",
            _S.INVALID_ARGUMENT,
        ),
        _c("EMPTY_IDENTIFIER", "the field is empty", _S.INVALID_ARGUMENT),
        _c("EXCHANGE_ID_REQUIRED", "the field is required", _S.INVALID_ARGUMENT),
        _c("EXCHANGE_NOT_COMPLETED", "mall exchange … is …, not completed", _S.FAILED_PRECONDITION),
        _c(
            "FAILED_PRECONDITION",
            "the request conflicts with the state of things",
            _S.FAILED_PRECONDITION,
        ),
        _c(
            "FINGERPRINT_ALREADY_USED",
            "this device or identifier already stands behind another invitee",
            _S.FAILED_PRECONDITION,
        ),
        _c("GRANTS_DISABLED", "coupon grants are not configured", _S.FAILED_PRECONDITION),
        _c("GRANT_KEY_REUSED", "grant_key was used for another grant", _S.ALREADY_EXISTS),
        _c(
            "GROSS_BELOW_PAID",
            "gross_amount_fen (before discounts) is less than paid_amount_fen",
            _S.INVALID_ARGUMENT,
        ),
        _c("HOLD_", "hold … is already …", _S.FAILED_PRECONDITION),
        _c("HOLD_EXPIRED", "hold … timed out", _S.FAILED_PRECONDITION),
        _c("HOLD_NOT_DUE", "hold is not due", _S.FAILED_PRECONDITION),
        _c("HOLD_POSTED", "the hold was posted already", _S.FAILED_PRECONDITION),
        _c("HOLD_VOIDED", "the hold was voided already", _S.FAILED_PRECONDITION),
        _http("HTTP_ERROR", None, "another HTTP-level refusal (status as sent)"),
        _c(
            "IDEMPOTENCY_IN_PROGRESS",
            "a request with this … is still being processed; retry shortly",
            _S.ABORTED,
        ),
        _c(
            "IDEMPOTENCY_KEY_INVALID",
            "… must be printable and at most … characters",
            _S.INVALID_ARGUMENT,
        ),
        _c("IDEMPOTENCY_KEY_REQUIRED", "the field is required", _S.INVALID_ARGUMENT),
        _c(
            "IDEMPOTENCY_KEY_REUSED",
            "request_key was already used for different identifiers",
            _S.ABORTED,
        ),
        _c(
            "IDENTIFIER_ERASED",
            "identifiers[…] belonged to an erased member; enrolling it again needs the person's explicit re-enrolment (reenrol)",
            _S.FAILED_PRECONDITION,
        ),
        _c(
            "IDENTIFIER_QUARANTINED",
            "identifiers[…] is quarantined: it links too many members to be trusted",
            _S.FAILED_PRECONDITION,
        ),
        _c("IDENTIFIER_TOO_LONG", "the field is longer than … characters", _S.INVALID_ARGUMENT),
        _c(
            "IDENTIFY_CONTENDED",
            "identify kept losing races to concurrent calls; retry",
            _S.UNAVAILABLE,
        ),
        _c("ILLEGAL_STATUS_TRANSITION", "a … template cannot become …", _S.INVALID_ARGUMENT),
        _c(
            "INSUFFICIENT_POINTS",
            "member … has … points to spend…, … requested",
            _S.FAILED_PRECONDITION,
        ),
        _c(
            "INTERNAL",
            "an unexpected failure of ours, logged with its trace id; nothing internal is told",
            _S.INTERNAL,
        ),
        _c("INVALID_", "… is required (at most 256 printable characters)", _S.INVALID_ARGUMENT),
        _c("INVALID_ACTION", "action … is not one of …", _S.INVALID_ARGUMENT),
        _c("INVALID_AGE", "older_than_days must be 1..…", _S.INVALID_ARGUMENT),
        _c("INVALID_AMOUNT", "refunded_amount_fen must be positive", _S.INVALID_ARGUMENT),
        _c("INVALID_APP_ID", "not an app id: …", _S.INVALID_ARGUMENT),
        _c(
            "INVALID_ARGUMENT",
            "the request does not match the route's schema (field says where)",
            _S.INVALID_ARGUMENT,
        ),
        _c("INVALID_AUDIENCE", "audience must be one of …", _S.INVALID_ARGUMENT),
        _c("INVALID_BATCH_SIZE", "batch_size is 0..10000", _S.INVALID_ARGUMENT),
        _c("INVALID_BIRTHDAY", "birthday month … day … is not a date", _S.INVALID_ARGUMENT),
        _c("INVALID_BRANCH", "a journey branch's cases are malformed", _S.INVALID_ARGUMENT),
        _c("INVALID_BUDGET", "coupons must be 0..1000000", _S.INVALID_ARGUMENT),
        _c("INVALID_CALLBACK", "createTime is not a number", _S.INVALID_ARGUMENT),
        _c(
            "INVALID_CSV_HEADER",
            "the CSV's header lacks a required column (a bulk earn upload)",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "INVALID_CARRIER",
            "carrier is too long or has control characters (e.g. a NUL byte)",
            _S.INVALID_ARGUMENT,
        ),
        _c("INVALID_CASH_FEN", "a mall item's cash price is out of bounds", _S.INVALID_ARGUMENT),
        _c(
            "INVALID_CHARACTERS",
            "text the database cannot store (e.g. a NUL byte) in a field without a check of its own",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "INVALID_CLIENT_ID",
            "client id: lower-case letters, digits, '_', '.', '-'; at most 63",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "INVALID_CONDITION", "a journey condition is not {fact, op, value}", _S.INVALID_ARGUMENT
        ),
        _c("INVALID_CONSENT_CHANNEL", "… consent is not given per …", _S.INVALID_ARGUMENT),
        _c("INVALID_CONSENT_PURPOSE", "purpose is missing or unknown", _S.INVALID_ARGUMENT),
        _c("INVALID_COUPON_CODE", "the field[…] is not a coupon code", _S.INVALID_ARGUMENT),
        _c(
            "INVALID_COUPON_TEMPLATE_ID",
            "coupon_template_id is too long or has control characters (e.g. a NUL byte)",
            _S.INVALID_ARGUMENT,
        ),
        _c("INVALID_CURSOR", "cursor is not one this API returned", _S.INVALID_ARGUMENT),
        _c("INVALID_DATE", "the field must be a date, YYYY-MM-DD", _S.INVALID_ARGUMENT),
        _c("INVALID_DAYS", "the field must be between 0 and 3660", _S.INVALID_ARGUMENT),
        _c(
            "INVALID_DEVICE_ID",
            "device_id must be at most … printable characters",
            _S.INVALID_ARGUMENT,
        ),
        _c("INVALID_DURATION", "a journey duration is malformed", _S.INVALID_ARGUMENT),
        _c("INVALID_EVENT_ID", "event_id must be a UUID", _S.INVALID_ARGUMENT),
        _c(
            "INVALID_EXCHANGE_ID",
            "the field is not a mall exchange id (a UUID)",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "INVALID_FULFILMENT",
            "fulfilment must be one of … (or empty), not …",
            _S.INVALID_ARGUMENT,
        ),
        _c("INVALID_GENDER", "gender is female, male or other", _S.INVALID_ARGUMENT),
        _c("INVALID_GOAL", "a journey's goal is malformed", _S.INVALID_ARGUMENT),
        _c("INVALID_GROUP_BY", "group_by must be store, guide or channel", _S.INVALID_ARGUMENT),
        _c("INVALID_HOLDOUT", "a journey's holdout_percent is out of bounds", _S.INVALID_ARGUMENT),
        _c("INVALID_HOLD_ID", "hold_id is not a hold id (a UUID)", _S.INVALID_ARGUMENT),
        _c("INVALID_ID", "the field must be at most … printable characters", _S.INVALID_ARGUMENT),
        _c(
            "INVALID_IDEMPOTENCY_KEY",
            "the field must be at most … printable characters",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "INVALID_IDENTIFIER_HASHES",
            "at most … identifier hashes of at most … characters",
            _S.INVALID_ARGUMENT,
        ),
        _c("INVALID_INVITE_CODE", "invite_code must be … characters of …", _S.INVALID_ARGUMENT),
        _c(
            "INVALID_ISSUE_KEY",
            "issue_key must be 1 to … printable characters",
            _S.INVALID_ARGUMENT,
        ),
        _c("INVALID_ITEM", "a coupon's item (sku) is malformed", _S.INVALID_ARGUMENT),
        _c("INVALID_ITEM_ID", "the field is not a mall item id (a UUID)", _S.INVALID_ARGUMENT),
        _c("INVALID_ITEM_KIND", "kind must be one of …", _S.INVALID_ARGUMENT),
        _c("INVALID_ITEM_STATUS", "status must be one of …", _S.INVALID_ARGUMENT),
        _c("INVALID_JOURNEY", "a journey definition is a JSON object", _S.INVALID_ARGUMENT),
        _c("INVALID_JOURNEY_ID", "a journey id is malformed", _S.INVALID_ARGUMENT),
        _c("INVALID_JSON", "definition is not JSON: …", _S.INVALID_ARGUMENT),
        _c("INVALID_LIMIT", "limit must be between 1 and …", _S.INVALID_ARGUMENT),
        _c("INVALID_LOCATION", "store coordinates are not WGS-84 degrees", _S.INVALID_ARGUMENT),
        _c("INVALID_MEMBER_ID", "the field is not a member id", _S.INVALID_ARGUMENT),
        _c("INVALID_MONTH", "month is YYYY-MM", _S.INVALID_ARGUMENT),
        _c(
            "INVALID_NAME",
            "a name is empty, too long or has control characters",
            _S.INVALID_ARGUMENT,
        ),
        _c("INVALID_NOTE", "a note is 1-1000 characters", _S.INVALID_ARGUMENT),
        _c("INVALID_OAUTH_CODE", "WeCom did not accept the OAuth code", _S.PERMISSION_DENIED),
        _c("INVALID_OCCURRED_AT", "occurred_at is in the future", _S.INVALID_ARGUMENT),
        _c(
            "INVALID_OPERATOR_ID",
            "operator_id is too long or has control characters (e.g. a NUL byte)",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "INVALID_OPERATOR_USER",
            "X-Operator-User: 1 to 64 letters, digits, '_', '.', '@', '-'",
            _S.INVALID_ARGUMENT,
        ),
        _c("INVALID_ORDER_ID", "order_id is not an order id", _S.INVALID_ARGUMENT),
        _c("INVALID_PAGE_SIZE", "page_size must be 1..…", _S.INVALID_ARGUMENT),
        _c("INVALID_PAGE_TOKEN", "page_token is not one this service gave", _S.INVALID_ARGUMENT),
        _c(
            "INVALID_PAYMENT_REFERENCE",
            "payment_reference is too long or has control characters (e.g. a NUL byte)",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "INVALID_PERCENT", "a percentage coupon's percent is out of bounds", _S.INVALID_ARGUMENT
        ),
        _c("INVALID_PERIOD", "to must be after from", _S.INVALID_ARGUMENT),
        _c(
            "INVALID_PER_MEMBER_LIMIT",
            "a mall item's per-member limit is out of bounds",
            _S.INVALID_ARGUMENT,
        ),
        _c("INVALID_PHONE", "the field is not a valid phone number", _S.INVALID_ARGUMENT),
        _c("INVALID_POINTS", "points_to_redeem must not be negative", _S.INVALID_ARGUMENT),
        _c(
            "INVALID_POINTS_PRICE",
            "a mall item's points price is out of bounds",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "INVALID_POS_TRANSACTION_ID",
            "pos_transaction_id is too long or has control characters (e.g. a NUL byte)",
            _S.INVALID_ARGUMENT,
        ),
        _c("INVALID_PRIORITY", "a journey's priority is out of bounds", _S.INVALID_ARGUMENT),
        _c(
            "INVALID_PROGRAMME",
            "effective_from is in the past: a new version applies from now or later, history is not rewritten",
            _S.INVALID_ARGUMENT,
        ),
        _c("INVALID_QUANTITY", "lines[…].quantity must be at least 1", _S.INVALID_ARGUMENT),
        _c("INVALID_RADIUS", "radius_m must be 1..…", _S.INVALID_ARGUMENT),
        _c(
            "INVALID_RANGE",
            "to_day must be on or after from_day, at most 366 days later",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "INVALID_RATE_LIMIT",
            "give both a positive rate and a burst of at least 1, or neither",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "INVALID_REASON",
            "reason is too long or has control characters (e.g. a NUL byte)",
            _S.INVALID_ARGUMENT,
        ),
        _c("INVALID_REENTRY", "a journey's reentry policy is malformed", _S.INVALID_ARGUMENT),
        _c(
            "INVALID_REFERENCE",
            "reference is too long or has control characters (e.g. a NUL byte)",
            _S.INVALID_ARGUMENT,
        ),
        _c("INVALID_ROLE", "role must be one of …", _S.INVALID_ARGUMENT),
        _c("INVALID_SCOPE", "scope is staff or store", _S.INVALID_ARGUMENT),
        _c("INVALID_SESSION", "not a workstation session", _S.PERMISSION_DENIED),
        _c(
            "INVALID_SHARDS",
            "a coupon template's stock_shards is out of bounds",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "INVALID_SKU",
            "sku is too long or has control characters (e.g. a NUL byte)",
            _S.INVALID_ARGUMENT,
        ),
        _c("INVALID_SPLIT", "a journey split's branches are malformed", _S.INVALID_ARGUMENT),
        _c(
            "INVALID_STATUS", "status is pending, approved, rejected or closed", _S.INVALID_ARGUMENT
        ),
        _c(
            "INVALID_STATUS_TRANSITION", "an item that is … cannot become …", _S.FAILED_PRECONDITION
        ),
        _c("INVALID_STEP", "a journey step is not an object", _S.INVALID_ARGUMENT),
        _c("INVALID_STEP_ID", "a journey step id is not a valid id", _S.INVALID_ARGUMENT),
        _c("INVALID_STOCK", "a mall item's stock is out of bounds", _S.INVALID_ARGUMENT),
        _c(
            "INVALID_STORE_ID",
            "store_id: ASCII letters, digits, '-' and '_' only",
            _S.INVALID_ARGUMENT,
        ),
        _c("INVALID_STORE_STATUS", "status must be one of …", _S.INVALID_ARGUMENT),
        _c("INVALID_TAG", "a tag is at most … printable characters", _S.INVALID_ARGUMENT),
        _c(
            "INVALID_TAKEOVER",
            "the takeover staff member must be another active staff member",
            _S.FAILED_PRECONDITION,
        ),
        _c("INVALID_TASK", "a journey guide task is malformed", _S.INVALID_ARGUMENT),
        _c(
            "INVALID_TEMPLATE_ID",
            "the field must be 1 to … printable characters",
            _S.INVALID_ARGUMENT,
        ),
        _c("INVALID_TIME", "a journey local time is malformed", _S.INVALID_ARGUMENT),
        _c("INVALID_TIMESTAMP", "timestamp is not a number", _S.INVALID_ARGUMENT),
        _c(
            "INVALID_TIME_ZONE",
            "time_zone is an IANA zone name, e.g. Asia/Shanghai",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "INVALID_TRACKING_NUMBER",
            "tracking_number is too long or has control characters (e.g. a NUL byte)",
            _S.INVALID_ARGUMENT,
        ),
        _c("INVALID_TTL", "ttl_seconds must be between 0 and …", _S.INVALID_ARGUMENT),
        _c("INVALID_UNTIL", "until is required and must be in the future", _S.INVALID_ARGUMENT),
        _c(
            "INVALID_VALIDITY",
            "a coupon's validity (valid_days) is out of bounds",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "INVALID_WAIT",
            "a journey wait needs exactly one of duration, until_local_time, event",
            _S.INVALID_ARGUMENT,
        ),
        _c("INVALID_WHERE", "a journey entry filter is malformed", _S.INVALID_ARGUMENT),
        _c("INVALID_WINDOW", "window_days must be 1..3660", _S.INVALID_ARGUMENT),
        _c("INVALID_XML", "XML with a DOCTYPE is refused", _S.INVALID_ARGUMENT),
        _c(
            "INVITEE_ALREADY_MEMBER",
            "the invitee was already a member before accepting the invite",
            _S.FAILED_PRECONDITION,
        ),
        _c("INVITE_CODE_REQUIRED", "invite_code is required", _S.INVALID_ARGUMENT),
        _c("ISSUE_KEY_REQUIRED", "issue_key is required", _S.INVALID_ARGUMENT),
        _c("ITEMS_REQUIRED", "items must name at least one member", _S.INVALID_ARGUMENT),
        _c("ITEM_ID_REQUIRED", "the field is required", _S.INVALID_ARGUMENT),
        _c(
            "ITEM_KIND_IMMUTABLE",
            "an item's kind cannot change; end it and create another",
            _S.FAILED_PRECONDITION,
        ),
        _c("ITEM_REQUIRED", "a coupon for items needs its skus", _S.INVALID_ARGUMENT),
        _c("JOURNEY_PAUSED", "the journey is paused", _S.FAILED_PRECONDITION),
        _c(
            "JUNK_IDENTIFIER",
            "identifiers[…].value is a placeholder or test value, never an identifier",
            _S.INVALID_ARGUMENT,
        ),
        _c("KEY_ID_INVALID", "the key id must be 1 to … printable characters", _S.UNAUTHENTICATED),
        _c("KEY_INVALID", "the api key does not match", _S.UNAUTHENTICATED),
        _c("KEY_REVOKED", "the signing key was revoked", _S.UNAUTHENTICATED),
        _c("KEY_UNKNOWN", "no such signing key", _S.UNAUTHENTICATED),
        _c(
            "KIND_CHANGED",
            "a new version keeps the kind; create another template instead",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "LINES_TOTAL_MISMATCH",
            "lines add up to … fen but gross_amount_fen is … (with coupons, lines carry amounts before the coupons)",
            _S.INVALID_ARGUMENT,
        ),
        _c("LINE_FIELD_TOO_LONG", "….… is longer than … characters", _S.INVALID_ARGUMENT),
        _c("MALFORMED_MEMBER_CODE", "code must be … digits starting with …", _S.INVALID_ARGUMENT),
        _c("MALL_ITEM_CHANGED", "mall item … changed during the exchange; retry", _S.ABORTED),
        _c("MALL_ITEM_ENDED", "mall item … has ended and cannot change", _S.FAILED_PRECONDITION),
        _c("MALL_ITEM_NOT_ACTIVE", "mall item … is …", _S.FAILED_PRECONDITION),
        _c("MALL_ITEM_OUT_OF_STOCK", "mall item … is out of stock", _S.FAILED_PRECONDITION),
        _c("MALL_ITEM_OUT_OF_WINDOW", "mall item … is not on sale now", _S.FAILED_PRECONDITION),
        _c(
            "MALL_MEMBER_LIMIT_REACHED",
            "a member may exchange mall item … at most … time(s)",
            _S.FAILED_PRECONDITION,
        ),
        _c(
            "MEMBER_ASSERTION_REQUIRED",
            "this route acts for one member: send X-Member-Appid and X-Member-Openid",
            _S.PERMISSION_DENIED,
        ),
        _c("MEMBER_CODE_BUSY", "could not draw a fresh member code; retry", _S.UNAVAILABLE),
        _c(
            "MEMBER_CODE_EXPIRED",
            "code expired at …; ask the member to refresh it",
            _S.FAILED_PRECONDITION,
        ),
        _c(
            "MEMBER_CODE_INVALID",
            "code is not a member code this brand issued",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "MEMBER_CODE_USED",
            "code was already used; ask the member to refresh it",
            _S.FAILED_PRECONDITION,
        ),
        _c(
            "MEMBER_ERASED",
            "the member was erased: nothing more is written for them",
            _S.NOT_FOUND,
            _S.FAILED_PRECONDITION,
        ),
        _c("MEMBER_ID_REQUIRED", "the field is required", _S.INVALID_ARGUMENT),
        _c(
            "MEMBER_LIMIT_REACHED",
            "member … already holds the limit of … coupon(s) of …",
            _S.FAILED_PRECONDITION,
        ),
        _c(
            "MEMBER_MISMATCH",
            "the request names another member than the one asserted",
            _S.PERMISSION_DENIED,
        ),
        _c(
            "MEMBER_NOT_CONFIGURED",
            "consent is recorded by the member service, and MEMBER_ADDR is not set",
            _S.FAILED_PRECONDITION,
        ),
        _c("MEMBER_UNAVAILABLE", "the member service is unavailable: …", _S.UNAVAILABLE),
        _c("MERGE_NOT_ACTIVE", "merge … is …", _S.FAILED_PRECONDITION),
        _c(
            "MESSAGE_TOO_LARGE",
            "the request message is … bytes; at most … are accepted (send fewer orders per call)",
            _S.INVALID_ARGUMENT,
        ),
        _http("METHOD_NOT_ALLOWED", 405, "the route does not take this HTTP method"),
        _c("MISSING_COUPON", "a journey coupon step names no coupon", _S.INVALID_ARGUMENT),
        _c("MISSING_ENTRY", "a journey has no entry event", _S.INVALID_ARGUMENT),
        _c("MISSING_FIELD", "the field is required", _S.INVALID_ARGUMENT),
        _c("MISSING_NEXT", "a journey step names no next step", _S.INVALID_ARGUMENT),
        _c("MISSING_STORE", "store_id is required", _S.INVALID_ARGUMENT),
        _c("MISSING_TAG", "tag is required", _S.INVALID_ARGUMENT),
        _c("MISSING_TEMPLATE", "a subscription tap names its template", _S.INVALID_ARGUMENT),
        _c(
            "NAMESPACE_REQUIRED",
            "the field: a … needs the app or platform it belongs to in namespace",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "NAME_NOT_PRINTABLE",
            "name contains control characters (e.g. a NUL byte)",
            _S.INVALID_ARGUMENT,
        ),
        _c("NAME_REQUIRED", "name is required", _S.INVALID_ARGUMENT),
        _c("NAME_TOO_LONG", "name is longer than its limit", _S.INVALID_ARGUMENT),
        _c("NEGATIVE_AMOUNT", "lines[…].paid_amount_fen must not be negative", _S.INVALID_ARGUMENT),
        _c("NONCE_INVALID", "X-Nonce must be at most … printable characters", _S.UNAUTHENTICATED),
        _c("NONCE_REPLAYED", "this nonce was already used", _S.UNAUTHENTICATED),
        _c(
            "NONCE_STORE_RESET",
            "the gateway's nonce store was reset after this request was signed; sign it again with the current time",
            _S.UNAUTHENTICATED,
        ),
        _c(
            "NONCE_STORE_UNAVAILABLE",
            "the gateway cannot check request nonces right now; retry later",
            _S.UNAVAILABLE,
        ),
        _c(
            "NOT_A_NEW_MEMBER",
            "this coupon is for new members only (no order yet)",
            _S.FAILED_PRECONDITION,
        ),
        _c(
            "NOT_A_STORE_JOURNEY",
            "only a journey entered by near_store can be launched at a store",
            _S.FAILED_PRECONDITION,
        ),
        _c(
            "NOT_CLAIMABLE", "members cannot claim coupons of this template", _S.FAILED_PRECONDITION
        ),
        _c(
            "NOT_FIRST_ORDER",
            "the coupon is only for the member's first order",
            _S.FAILED_PRECONDITION,
        ),
        _c("NOT_FOUND", "no such route (HTTP), or no such thing", _S.NOT_FOUND),
        _c(
            "NOT_GOODS",
            "mall exchange … was a coupon, issued at once: nothing ships",
            _S.FAILED_PRECONDITION,
        ),
        _c("NOT_REFERRED", "member … was not referred", _S.NOT_FOUND),
        _c("NOT_SHIPPABLE", "mall exchange … is …: nothing ships", _S.FAILED_PRECONDITION),
        _c(
            "NOT_STACKABLE",
            "the coupon does not stack with another one on the order",
            _S.FAILED_PRECONDITION,
        ),
        _c("NOT_STAFF", "the WeCom user is not an active staff member", _S.PERMISSION_DENIED),
        _c(
            "NOT_YOUR_CUSTOMER",
            "the member is not bound to you or your store",
            _S.PERMISSION_DENIED,
        ),
        _c("NO_CHANNEL", "at least one channel", _S.INVALID_ARGUMENT),
        _c(
            "NO_ELIGIBLE_ITEMS",
            "no item in the cart is covered by the coupon",
            _S.FAILED_PRECONDITION,
        ),
        _c("NO_IDENTIFIER", "at least one identifier is required", _S.INVALID_ARGUMENT),
        _c("NO_PARKED_EVENTS", "no parked events for this member", _S.NOT_FOUND),
        _c("NO_PAYMENT_DUE", "mall exchange … is …: no payment is due", _S.FAILED_PRECONDITION),
        _c("NO_PROFILE_FIELD", "set at least one profile field", _S.INVALID_ARGUMENT),
        _c("NO_PROGRAMME", "no tier programme … is in force", _S.NOT_FOUND),
        _c("NO_SAVING", "the coupon would not lower the price of the item", _S.FAILED_PRECONDITION),
        _c("NO_STEPS", "a journey has no steps", _S.INVALID_ARGUMENT),
        _c(
            "OCCURRED_AT_TOO_OLD",
            "occurred_at … is more than … hours ago; growth actions are accepted up to … hours after they happen",
            _S.INVALID_ARGUMENT,
        ),
        _c("OPERATOR_ID_REQUIRED", "operator_id is required", _S.INVALID_ARGUMENT),
        _c("OPERATOR_REQUIRED", "operator is required", _S.INVALID_ARGUMENT),
        _c(
            "OPERATOR_USER_NOT_ALLOWED",
            "only an operator console asserts an operator user",
            _S.PERMISSION_DENIED,
        ),
        _c("ORDERED_AT_IN_FUTURE", "ordered_at … is in the future", _S.INVALID_ARGUMENT),
        _c(
            "ORDERED_AT_REQUIRED",
            "ordered_at is required for an offline order",
            _S.INVALID_ARGUMENT,
        ),
        _c("ORDERS_REQUIRED", "orders is empty", _S.INVALID_ARGUMENT),
        _c(
            "ORDER_AMOUNT_TOO_LARGE",
            "paid_amount_fen … exceeds the limit of … fen per order",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "ORDER_TOO_OLD",
            "ordered_at … is older than the … h offline window",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "OUT_OF_RANGE", "a number too large for the service (field says which)", _S.OUT_OF_RANGE
        ),
        _c("OUT_OF_STOCK", "coupon template … is out of stock", _S.FAILED_PRECONDITION),
        _c(
            "PAID_AMOUNT_MISMATCH",
            "paid_amount_fen is … but gross … - coupons … - points value … = …",
            _S.FAILED_PRECONDITION,
        ),
        _c(
            "PAYMENT_AMOUNT_MISMATCH",
            "mall exchange … asks … fen in cash but the payment was … fen",
            _S.FAILED_PRECONDITION,
        ),
        _c(
            "PAYMENT_ALREADY_CONFIRMED",
            "mall exchange … was paid with another payment reference",
            _S.ABORTED,
        ),
        _c("PAYMENT_REFERENCE_REQUIRED", "payment_reference is required", _S.INVALID_ARGUMENT),
        _c(
            "PAYMENT_REFERENCE_USED", "payment reference … already paid mall exchange …", _S.ABORTED
        ),
        _c("PAYMENT_TIMED_OUT", "mall exchange … is …: no payment is due", _S.FAILED_PRECONDITION),
        _c("PERIOD_REQUIRED", "from and to are required", _S.INVALID_ARGUMENT),
        _c("PERMISSION_DENIED", "the caller may not do this", _S.PERMISSION_DENIED),
        _c("PHONE_CODE_INVALID", "this phone code was issued to another app", _S.INVALID_ARGUMENT),
        _c(
            "PHONE_OR_MEMBER_NUMBER_REQUIRED",
            "give exactly one of phone or member_number",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "PHONE_REQUIRED",
            "a member key is required: phone, member_code or card",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "POINTS_TOO_LARGE",
            "points_to_redeem exceeds the limit of … points per order",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "POS_TRANSACTION_ID_NOT_PRINTABLE",
            "pos_transaction_id contains control characters (e.g. a NUL byte)",
            _S.INVALID_ARGUMENT,
        ),
        _c("POS_TRANSACTION_ID_REQUIRED", "pos_transaction_id is required", _S.INVALID_ARGUMENT),
        _c(
            "POS_TRANSACTION_ID_TOO_LONG",
            "pos_transaction_id is longer than its limit",
            _S.INVALID_ARGUMENT,
        ),
        _c("PURPOSE_REQUIRED", "purpose is required", _S.INVALID_ARGUMENT),
        _c("RATE_LIMITED", "too many requests: wait Retry-After seconds", _S.RESOURCE_EXHAUSTED),
        _c("REASON_REQUIRED", "reason is required", _S.INVALID_ARGUMENT),
        _c(
            "REFERENCE_ID_REQUIRED",
            "reference_id is required (at most 128 characters)",
            _S.INVALID_ARGUMENT,
        ),
        _c("REFERENCE_REQUIRED", "reference is required", _S.INVALID_ARGUMENT),
        _c("REFERRAL_CYCLE", "the inviter was invited by this invitee", _S.FAILED_PRECONDITION),
        _c("REFUND_EXCEEDS_ORDER", "this order was already refunded in full", _S.INVALID_ARGUMENT),
        _c(
            "REFUND_TRANSACTION_ID_REQUIRED",
            "refund_transaction_id is required",
            _S.INVALID_ARGUMENT,
        ),
        _c("REGISTERED_AT_REQUIRED", "invitee_registered_at is required", _S.INVALID_ARGUMENT),
        _c(
            "REQUEST_KEY_REQUIRED",
            "request_key is required: a retry must be recognisable",
            _S.INVALID_ARGUMENT,
        ),
        _c("RESOURCE_EXHAUSTED", "a limit was reached", _S.RESOURCE_EXHAUSTED),
        _c("REVIEW_DECIDED", "review … is already …", _S.FAILED_PRECONDITION),
        _c("REWARDS_UNAVAILABLE", "rewards service: …", _S.UNAVAILABLE),
        _c("ROUTE_NOT_IN_POLICY", "… … is not open to any client", _S.PERMISSION_DENIED),
        _c("RPC_NOT_IN_POLICY", "… is not open to any client", _S.PERMISSION_DENIED),
        _c("SCOPE_MISSING", "this route needs the scope …", _S.PERMISSION_DENIED),
        _c(
            "SCOPE_NOT_FOR_KIND",
            "… only for operator_console or ops_tooling clients, not …",
            _S.INVALID_ARGUMENT,
        ),
        _c("SELF_REFERRAL", "a member cannot accept their own invite", _S.FAILED_PRECONDITION),
        _c(
            "SERVICE_NOT_DEPLOYED",
            "the route's backing service is not deployed here",
            _S.UNAVAILABLE,
        ),
        _c("SESSION_EXPIRED", "the workstation session expired", _S.PERMISSION_DENIED),
        _c(
            "SHUTTING_DOWN",
            "this instance is draining: retry at once, on another instance",
            _S.UNAVAILABLE,
        ),
        _c("SIGNATURE_INVALID", "the signature does not match", _S.UNAUTHENTICATED),
        _c("SKU_NOT_ALLOWED", "a coupon item has no sku", _S.INVALID_ARGUMENT),
        _c("SKU_REQUIRED", "sku is required", _S.INVALID_ARGUMENT),
        _c("SOURCE_REQUIRED", "source is required", _S.INVALID_ARGUMENT),
        _c("STAFF_CODE_TAKEN", "staff code … belongs to another staff member", _S.ALREADY_EXISTS),
        _c("STAFF_RESIGNED", "staff … has resigned", _S.FAILED_PRECONDITION),
        _c(
            "STOCK_BELOW_EXCHANGED",
            "… already exchanged; stock_total cannot go below that",
            _S.FAILED_PRECONDITION,
        ),
        _c(
            "STOCK_BELOW_ISSUED",
            "… coupons were issued; total_stock cannot go below that",
            _S.FAILED_PRECONDITION,
        ),
        _c(
            "STORE_ID_FOR_POS_ONLY",
            "a pos client needs --store-id, and only a pos client has one",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "STORE_ID_NOT_PRINTABLE",
            "store_id contains control characters (e.g. a NUL byte)",
            _S.INVALID_ARGUMENT,
        ),
        _c("STORE_ID_REQUIRED", "store_id is required", _S.INVALID_ARGUMENT),
        _c("STORE_ID_TOO_LONG", "store_id is longer than its limit", _S.INVALID_ARGUMENT),
        _c(
            "STORE_MISMATCH",
            "the order or call names another store than the POS's own",
            _S.INVALID_ARGUMENT,
            _S.PERMISSION_DENIED,
        ),
        _c("STORE_NOT_ELIGIBLE", "the coupon is not valid at this store", _S.FAILED_PRECONDITION),
        _c(
            "TAG_BATCH_BUSY",
            "another rule-tag batch is running (a replica or the CronJob)",
            _S.FAILED_PRECONDITION,
        ),
        _c(
            "TAG_NAME_TOO_LONG",
            "WeCom tag names are at most 30 characters",
            _S.INVALID_ARGUMENT,
        ),
        _c("TEMPLATE_DRAFT", "the coupon template is a draft, not active", _S.FAILED_PRECONDITION),
        _c("TEMPLATE_ENDED", "coupon template … has ended", _S.FAILED_PRECONDITION),
        _c("TEMPLATE_EXISTS", "coupon template … already exists", _S.ABORTED),
        _c("TEMPLATE_EXPIRED", "the coupon template ended its validity", _S.FAILED_PRECONDITION),
        _c("TEMPLATE_ID_REQUIRED", "the field is required", _S.INVALID_ARGUMENT),
        _c("TEMPLATE_PAUSED", "the coupon template is paused", _S.FAILED_PRECONDITION),
        _c("TIER_NOT_ELIGIBLE", "the coupon is only for other tiers", _S.FAILED_PRECONDITION),
        _c("TIMESTAMP_INVALID", "X-Timestamp must be Unix time in seconds", _S.UNAUTHENTICATED),
        _c("TIMESTAMP_STALE", "X-Timestamp is more than … s from now", _S.UNAUTHENTICATED),
        _c("TIME_WITHOUT_OFFSET", "a time needs a UTC offset (RFC 3339)", _S.INVALID_ARGUMENT),
        _c("TOKEN_EXPIRED", "the bearer token has expired; ask for a new one", _S.UNAUTHENTICATED),
        _c("TOKEN_INVALID", "the bearer token is not one this gateway issued", _S.UNAUTHENTICATED),
        _c("TOO_FEW_MEMBERS", "name at least two members", _S.INVALID_ARGUMENT),
        _c("TOO_MANY_IDENTIFIERS", "at most … identifiers per call", _S.INVALID_ARGUMENT),
        _c("TOO_MANY_ITEMS", "a coupon names too many items", _S.INVALID_ARGUMENT),
        _c("TOO_MANY_LINES", "an order has at most … lines", _S.INVALID_ARGUMENT),
        _c(
            "TOO_MANY_MEMBER_IDS",
            "ResolveMemberIds takes at most 1,000 member ids per call",
            _S.INVALID_ARGUMENT,
        ),
        _c("TOO_MANY_STEPS", "a journey has too many steps", _S.INVALID_ARGUMENT),
        _c("TRACKING_NUMBER_REQUIRED", "tracking_number is required", _S.INVALID_ARGUMENT),
        _c("UNAUTHENTICATED", "who is calling could not be established", _S.UNAUTHENTICATED),
        _c("UNAVAILABLE", "a dependency is unavailable; retry later", _S.UNAVAILABLE),
        _c(
            "UNDECRYPTABLE_CALLBACK",
            "the callback body cannot be decrypted: …",
            _S.INVALID_ARGUMENT,
        ),
        _c("UNKNOWN_ACTION", "action … earns no points; known: …", _S.INVALID_ARGUMENT),
        _c("UNKNOWN_CHANNEL", "unknown channel …", _S.INVALID_ARGUMENT),
        _c("UNKNOWN_CLIENT", "no active client …", _S.NOT_FOUND),
        _c("UNKNOWN_COUPON", "coupon … does not exist", _S.NOT_FOUND),
        _c("UNKNOWN_EVENT", "unknown event …", _S.INVALID_ARGUMENT),
        _c("UNKNOWN_FACT", "a journey condition names an unknown fact", _S.INVALID_ARGUMENT),
        _c("UNKNOWN_HOLD", "hold … does not exist", _S.NOT_FOUND),
        _c("UNKNOWN_DEAD_LETTER", "no such dead letter (or it was redriven)", _S.NOT_FOUND),
        _c("UNKNOWN_IDENTIFIER", "no member owns this identifier", _S.NOT_FOUND),
        _c("UNKNOWN_IDENTIFIER_TYPE", "identifier.type is missing or unknown", _S.INVALID_ARGUMENT),
        _c("UNKNOWN_INVITE_CODE", "invite code … does not exist", _S.NOT_FOUND),
        _c("UNKNOWN_JOURNEY", "journey … does not exist", _S.NOT_FOUND),
        _c("UNKNOWN_KEY", "no active key …", _S.NOT_FOUND),
        _c("UNKNOWN_MALL_EXCHANGE", "mall exchange … does not exist", _S.NOT_FOUND),
        _c("UNKNOWN_MALL_ITEM", "mall item … does not exist", _S.NOT_FOUND),
        _c("UNKNOWN_MEMBER", "member … does not exist", _S.NOT_FOUND),
        _c("UNKNOWN_MERGE", "merge … does not exist", _S.NOT_FOUND),
        _c(
            "UNKNOWN_MESSAGE_CLASS",
            "a journey message names an unknown message class",
            _S.INVALID_ARGUMENT,
        ),
        _c(
            "UNKNOWN_OPERATOR", "a journey condition names an unknown operator", _S.INVALID_ARGUMENT
        ),
        _c("UNKNOWN_ORDER", "no order … seen yet", _S.NOT_FOUND),
        _c("UNKNOWN_PROGRAMME", "programme … has no version in force", _S.NOT_FOUND),
        _c("UNKNOWN_REASON", "reason … is unknown; known: …", _S.INVALID_ARGUMENT),
        _c("UNKNOWN_REVIEW", "review … does not exist", _S.NOT_FOUND),
        _c("UNKNOWN_SCOPE", "unknown scopes: …", _S.INVALID_ARGUMENT),
        _c("UNKNOWN_STAFF", "no such staff member", _S.NOT_FOUND, _S.FAILED_PRECONDITION),
        _c("UNKNOWN_STATUS", "status … is unknown; known: …", _S.INVALID_ARGUMENT),
        _c("UNKNOWN_STEP", "a journey names a step it does not have", _S.INVALID_ARGUMENT),
        _c("UNKNOWN_STEP_TYPE", "a journey step has an unknown type", _S.INVALID_ARGUMENT),
        _c("UNKNOWN_STORE", "store … does not exist", _S.NOT_FOUND),
        _c("UNKNOWN_TEMPLATE", "coupon template … does not exist", _S.NOT_FOUND),
        _c("UNKNOWN_TIER", "tier_code … is not on the ladder", _S.INVALID_ARGUMENT),
        _c("UNKNOWN_VALUE", "the field … is unknown; known: …", _S.INVALID_ARGUMENT),
        _c(
            "UNMERGE_NEWER_FIRST",
            "a later merge of the same members must be reversed first",
            _S.FAILED_PRECONDITION,
        ),
        _c("UNREACHABLE_STEP", "a journey step no path reaches", _S.INVALID_ARGUMENT),
        _c("VALIDITY_REQUIRED", "a coupon needs valid_days or valid_until", _S.INVALID_ARGUMENT),
        _c("VALUE_TOO_LONG", "the field is longer than … characters", _S.INVALID_ARGUMENT),
        _c("VERSION_MISMATCH", "coupon template … is at version …, not …", _S.ABORTED),
        _c(
            "WECHAT_APP_NOT_CONFIGURED",
            "app … has no WeChat credentials here: its phone codes cannot be checked",
            _S.PERMISSION_DENIED,
        ),
        _c(
            "WECHAT_UNAVAILABLE",
            "WeChat could not verify the phone now; retry later",
            _S.UNAVAILABLE,
        ),
        _c("WECOM_ERROR", "WeCom answered an error, or did not answer", _S.UNAVAILABLE),
        _c(
            "WRONG_RECEIVER",
            "the callback is for another corp (receive id mismatch)",
            _S.PERMISSION_DENIED,
        ),
    )
}

# Set by the test suite: an unregistered code, or one raised under a status
# it is not registered with, fails where it is raised.
STRICT_ENV = "LOYALTY_STRICT_ERROR_CODES"


class UnregisteredErrorCode(AssertionError):
    """A code raised that servicekit/error_codes.py does not hold (tests only)."""


def check(code: str, status: grpc.StatusCode) -> None:
    """Refuse (under tests) or log (otherwise) a code the registry does not hold
    with this status."""
    entry = ERROR_CODES.get(code)
    if entry is not None and (status in entry.statuses or not entry.statuses):
        return
    problem = (
        f"error code {code} is not registered in servicekit/error_codes.py"
        if entry is None
        else f"error code {code} is registered as {[s.name for s in entry.statuses]},"
        f" raised as {status.name}"
    )
    if os.environ.get(STRICT_ENV):
        raise UnregisteredErrorCode(problem)
    log.error("%s", problem)


def markdown() -> str:
    """docs/errors.md's table: every code, its HTTP and gRPC statuses and meaning."""
    lines = ["| code | HTTP | gRPC | meaning |", "|---|---|---|---|"]
    for code in sorted(ERROR_CODES):
        e = ERROR_CODES[code]
        http = " / ".join(str(h) for h in e.http_statuses) if e.http_only != 0 else "4xx"
        grpc_names = " / ".join(s.name for s in e.statuses) or "-"
        lines.append(f"| `{code}` | {http} | {grpc_names} | {e.meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
