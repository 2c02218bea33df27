"""The console's web app: server-rendered pages (Jinja2) and real HTML forms.

Every request finds its session by the cookie (console/sessions.py); every
POST carries the session's CSRF token or is refused with 403; every action
checks the operator's role (console/roles.py) before it calls the gateway with
that role's client (console/gateway_client.py), asserting the operator. The
console holds no business data: pages show what the gateway answers.
"""

from __future__ import annotations

import hmac
import importlib.util
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

import asyncpg
import pyotp
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from gateway.api.analytics import BRAND_TIME_ZONE
from servicekit.db import create_pool
from servicekit.errors import DomainError
from servicekit.redis_client import RedisClient, create_redis

from . import users
from .charts import DASHBOARDS, dashboard_view
from .gateway_client import Gateway, GatewayError, NoClientForRole
from .i18n import LOCALES, code_labels, fen_from_yuan, series_labels, translate, word, yuan
from .roles import Right, rights_of, role_for
from .sessions import COOKIE, Session, SessionStore
from .settings import ConsoleSettings
from .throttle import LoginThrottle

HERE = Path(__file__).resolve().parent


def echarts_dir() -> Path:
    """NiceGUI's wheel ships Apache ECharts as ES modules; served from the
    installed package, never a CDN (docs/console.md says why this package)."""
    spec = importlib.util.find_spec("nicegui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the nicegui package (which ships ECharts) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "elements" / "echart" / "dist"


def segment(value: str) -> str:
    """An id typed by an operator as one URL path segment ("/", "?" and "#" escaped)."""
    return quote(value, safe="")


class Refused(Exception):
    """Answer with a page saying why, and this status."""

    def __init__(self, status: int, message_key: str) -> None:
        self.status = status
        self.message_key = message_key


class SignInRequired(Exception):
    pass


class FormInvalid(Exception):
    """A form the console itself refuses (before any gateway call): a page
    with the catalogue's text (message_key) and the code, status 400."""

    def __init__(self, code: str, message_key: str) -> None:
        self.code = code
        self.message_key = message_key


class Redirect(Exception):
    def __init__(self, to: str) -> None:
        self.to = to


class Console:
    """What every request needs: settings, the clock, stores, the gateway."""

    def __init__(self, settings: ConsoleSettings, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.clock = clock
        self.pool: asyncpg.Pool | None = None
        self.redis: RedisClient | None = None
        self.sessions: SessionStore
        self.throttle: LoginThrottle
        self.gateway: Gateway

    async def start(self) -> None:
        s = self.settings
        self.pool = await create_pool(s.database_url, min_size=1, max_size=4)
        self.redis = create_redis(s.redis_url)
        self.sessions = SessionStore(
            self.redis,
            s.redis_namespace,
            idle_seconds=s.console_session_idle_seconds,
            absolute_seconds=s.console_session_absolute_seconds,
            clock=self.clock,
        )
        self.throttle = LoginThrottle(
            self.redis,
            s.redis_namespace,
            per_account=s.console_login_max_failures_per_account,
            per_address=s.console_login_max_failures_per_address,
            window_seconds=s.console_login_window_seconds,
        )
        self.gateway = Gateway(s)

    async def stop(self) -> None:
        await self.gateway.aclose()
        if self.redis is not None:
            await self.redis.aclose()
        if self.pool is not None:
            await self.pool.close()


def build(settings: ConsoleSettings, *, clock: Callable[[], float] = time.time) -> FastAPI:
    console = Console(settings, clock)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await console.start()
        yield
        await console.stop()

    app = FastAPI(
        title="Loyalty operator console",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.console = console
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["yuan"] = yuan
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    echarts = echarts_dir()

    # ---- plumbing -------------------------------------------------------------

    def secure(request: Request) -> bool:
        return settings.console_cookie_secure or request.url.scheme == "https"

    def set_cookie(response: Response, request: Request, session: Session) -> None:
        response.set_cookie(
            COOKIE,
            session.session_id,
            httponly=True,
            secure=secure(request),
            samesite="strict",
            path="/",
        )

    def locale_of(session: Session | None) -> str:
        if session is not None and session.locale in LOCALES:
            return session.locale
        return settings.console_default_locale

    def page(
        request: Request,
        template: str,
        session: Session | None,
        status: int = 200,
        **context: Any,
    ) -> HTMLResponse:
        locale = locale_of(session)
        rights = rights_of(session.roles) if session and session.signed_in else frozenset()
        response = templates.TemplateResponse(
            request,
            template,
            {
                "t": lambda key, **args: translate(locale, key, **args),
                "word": lambda kind, code: word(locale, kind, code),
                "locale": locale,
                "session": session,
                "csrf_token": session.csrf_token if session else "",
                "can": {r.value: (r in rights) for r in Right},
                "dashboards": DASHBOARDS,
                **context,
            },
            status_code=status,
        )
        if session is not None:
            set_cookie(response, request, session)
        return response

    async def current(request: Request) -> Session | None:
        session = await console.sessions.load(request.cookies.get(COOKIE, ""))
        if session is None or not session.signed_in:
            return session
        # The account as it is now, on every request: a disabled (or deleted)
        # operator is signed out at once, a change of roles applies at once
        # (`python -m console users disable | roles`), not after the session's 12 h.
        assert console.pool is not None
        async with console.pool.acquire() as conn:
            roles = await users.state(conn, session.username)
        if roles is None:
            await console.sessions.delete(session.session_id)
            return None
        if tuple(sorted(roles)) != tuple(sorted(session.roles)):
            session.roles = roles
            await console.sessions.save(session)
        return session

    async def signed_in(request: Request, right: Right | None = None) -> Session:
        session = await current(request)
        if session is None or not session.signed_in:
            raise SignInRequired()
        if session.must_change_password and request.url.path != "/account/password":
            raise Redirect("/account/password")
        if right is not None and right not in rights_of(session.roles):
            raise Refused(403, "forbidden")
        return session

    async def form_of(request: Request, session: Session) -> dict[str, str]:
        """The posted form, once its CSRF token matched the session's."""
        form = await request.form()
        token = str(form.get("csrf_token", ""))
        if not token or not hmac.compare_digest(token, session.csrf_token):
            raise Refused(403, "csrf")
        return {k: str(v) for k, v in form.items()}

    async def acting(request: Request, right: Right) -> tuple[Session, dict[str, str]]:
        """A POST: session and CSRF first (so a forged POST learns nothing), then the role."""
        session = await current(request)
        if session is None or not session.signed_in:
            raise SignInRequired()
        form = await form_of(request, session)
        if session.must_change_password:
            raise Refused(403, "forbidden")
        if right not in rights_of(session.roles):
            raise Refused(403, "forbidden")
        return session, form

    async def call(session: Session, right: Right, method: str, path: str, **kw: Any) -> Any:
        role = role_for(session.roles, right)
        if role is None:
            raise Refused(403, "forbidden")
        return await console.gateway.call(role, session.username, method, path, **kw)

    @app.exception_handler(SignInRequired)
    async def _sign_in(request: Request, _: Exception) -> Response:
        if request.method == "POST":
            locale = locale_of(await console.sessions.load(request.cookies.get(COOKIE, "")))
            return HTMLResponse(translate(locale, "error.sign_in_first"), status_code=403)
        return RedirectResponse("/login", status_code=303)

    @app.exception_handler(FormInvalid)
    async def _form_invalid(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, FormInvalid)
        session = await current(request)
        return page(
            request, "message.html", session, 400, message_key=exc.message_key, detail=exc.code
        )

    @app.exception_handler(Redirect)
    async def _redirect(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Redirect)
        return RedirectResponse(exc.to, status_code=303)

    @app.exception_handler(Refused)
    async def _refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Refused)
        session = await current(request)
        return page(request, "message.html", session, exc.status, message_key=exc.message_key)

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        session = await current(request)
        return page(
            request,
            "message.html",
            session,
            exc.status if exc.status in (400, 403, 404, 409, 422) else 502,
            message_key="error.gateway",
            detail=f"{exc.code}: {exc.message}",
        )

    @app.exception_handler(NoClientForRole)
    async def _no_client(request: Request, exc: Exception) -> Response:
        session = await current(request)
        return page(
            request, "message.html", session, 503, message_key="error.gateway", detail=str(exc)
        )

    # ---- log-in ---------------------------------------------------------------

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/assets/echarts/{name}")
    async def echarts_asset(name: str) -> Response:
        path = (echarts / name).resolve()
        if path.parent != echarts.resolve() or not path.is_file() or path.suffix != ".js":
            return Response(status_code=404)
        return FileResponse(path, media_type="text/javascript")

    @app.get("/login")
    async def login_form(request: Request) -> Response:
        session = await current(request)
        if session is not None and session.signed_in:
            return RedirectResponse("/", status_code=303)
        if session is None:
            session = await console.sessions.new()
        return page(request, "login.html", session)

    @app.post("/login")
    async def login(request: Request) -> Response:
        session = await current(request)
        if session is None:
            # No session (or a timed-out one): the form is stale.
            fresh = await console.sessions.new()
            return page(request, "login.html", fresh, 403, error_key="login.expired")
        form = await form_of(request, session)
        username = form.get("username", "").strip()
        address = request.client.host if request.client else "unknown"
        if await console.throttle.locked(username, address):
            return page(request, "login.html", session, 429, error_key="login.locked")
        assert console.pool is not None
        async with console.pool.acquire() as conn:
            operator = await users.verify(conn, username, form.get("password", ""))
        error_key = "login.failed" if operator is None else ""
        if operator is not None and operator.totp_secret:
            code = form.get("totp", "").strip()
            if not pyotp.TOTP(operator.totp_secret).verify(
                code, for_time=int(console.clock()), valid_window=1
            ):
                error_key = "login.totp_failed"
        if error_key or operator is None:
            await console.throttle.failed(username, address)
            return page(request, "login.html", session, 401, error_key=error_key)
        await console.throttle.succeeded(username, address)
        fresh = await console.sessions.rotate(
            session,
            username=operator.username,
            roles=operator.roles,
            locale=session.locale,
            must_change_password=operator.must_change_password,
        )
        response = RedirectResponse(
            "/account/password" if operator.must_change_password else "/", status_code=303
        )
        set_cookie(response, request, fresh)
        return response

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        session = await current(request)
        if session is not None:
            await form_of(request, session)
            await console.sessions.delete(session.session_id)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    @app.post("/locale")
    async def set_locale(request: Request) -> Response:
        session = await current(request)
        if session is None:
            raise SignInRequired()
        form = await form_of(request, session)
        if form.get("locale") in LOCALES:
            session.locale = form["locale"]
            await console.sessions.save(session)
        # Back to the page the switch was on: a path of this site only, never
        # "//host" or "/\\host" (another site, as browsers read them).
        target = form.get("next", "/")
        local = target.startswith("/") and not target.startswith(("//", "/\\"))
        return RedirectResponse(target if local else "/", status_code=303)

    @app.get("/account/password")
    async def password_form(request: Request) -> Response:
        session = await signed_in(request)
        return page(request, "password.html", session)

    @app.post("/account/password")
    async def change_password(request: Request) -> Response:
        session = await current(request)
        if session is None or not session.signed_in:
            raise SignInRequired()
        form = await form_of(request, session)
        assert console.pool is not None
        try:
            async with console.pool.acquire() as conn:
                await users.set_password(conn, session.username, form.get("password", ""))
        except DomainError as exc:
            keys = {"PASSWORD_TOO_SHORT": "error.password_too_short"}
            return page(
                request,
                "password.html",
                session,
                400,
                error_key=keys.get(exc.code, ""),
                error=exc.code,
            )
        # A new password is a new session too.
        fresh = await console.sessions.rotate(
            session, username=session.username, roles=session.roles, locale=session.locale
        )
        response = RedirectResponse("/", status_code=303)
        set_cookie(response, request, fresh)
        return response

    # ---- dashboards -------------------------------------------------------------

    @app.get("/")
    async def home(request: Request) -> Response:
        await signed_in(request)
        return RedirectResponse("/dashboards/overview", status_code=303)

    @app.get("/dashboards/{name}")
    async def dashboard(request: Request, name: str) -> Response:
        session = await signed_in(request, Right.DASHBOARDS)
        if name not in DASHBOARDS:
            raise Refused(404, "error.not_found")
        # The brand's day (the analytics API's days are Asia/Shanghai days).
        today = datetime.fromtimestamp(console.clock(), ZoneInfo(BRAND_TIME_ZONE)).date()
        filters = {
            "from": request.query_params.get("from") or (today - timedelta(days=30)).isoformat(),
            "to": request.query_params.get("to") or today.isoformat(),
            "store": request.query_params.get("store", ""),
            "region": request.query_params.get("region", ""),
        }
        try:
            data = await call(
                session, Right.DASHBOARDS, "GET", f"/v1/admin/analytics/{name}", params=filters
            )
            error = ""
        except GatewayError as exc:
            data, error = None, f"{exc.code}: {exc.message}"
        locale = locale_of(session)
        view = dashboard_view(name, data, locale) if data is not None else None
        # Said, not silently ignored: a filter a dashboard cannot apply (no
        # store dimension) or applies to some figures only (gateway STORE_SCOPE).
        scope = (data or {}).get("filter") or {}
        store_filter = (
            scope.get("store_filter", "applied")
            if filters["store"] or filters["region"]
            else "applied"
        )
        return page(
            request,
            "dashboard.html",
            session,
            name=name,
            filters=filters,
            view=view,
            error=error,
            store_filter=store_filter,
            store_filter_applies_to=scope.get("store_filter_applies_to", []),
            series_labels=series_labels(locale),
            code_labels=code_labels(locale),
        )

    # ---- merge reviews ------------------------------------------------------------

    @app.get("/merge-reviews")
    async def merge_reviews(request: Request) -> Response:
        session = await signed_in(request, Right.MERGE_REVIEWS)
        data = await call(session, Right.MERGE_REVIEWS, "GET", "/v1/admin/merge-reviews")
        return page(
            request,
            "merge_reviews.html",
            session,
            reviews=data["reviews"],
            done=request.query_params.get("done", ""),
        )

    @app.post("/merge-reviews/{review_id}/{decision}")
    async def decide_review(request: Request, review_id: uuid.UUID, decision: str) -> Response:
        session, form = await acting(request, Right.MERGE_REVIEWS)
        if decision not in ("approve", "reject"):
            raise Refused(404, "forbidden")
        await call(
            session,
            Right.MERGE_REVIEWS,
            "POST",
            f"/v1/admin/merge-reviews/{review_id}/{decision}",
            json={"note": form.get("note", "")[:500]},
        )
        return RedirectResponse(f"/merge-reviews?done={review_id}", status_code=303)

    @app.get("/quarantine")
    async def quarantine(request: Request) -> Response:
        session = await signed_in(request, Right.QUARANTINE)
        data = await call(session, Right.QUARANTINE, "GET", "/v1/admin/quarantined-identifiers")
        return page(request, "quarantine.html", session, identifiers=data["identifiers"])

    # ---- members ---------------------------------------------------------------------

    async def member_page(
        request: Request, session: Session, member_id: str, status: int = 200, **extra: Any
    ) -> Response:
        member = None
        if member_id:
            try:
                uuid.UUID(member_id)
            except ValueError:
                return page(
                    request,
                    "members.html",
                    session,
                    400,
                    member=None,
                    member_id=member_id,
                    error_key="error.member_id",
                )
            member = await call(session, Right.MEMBERS, "GET", f"/v1/members/{member_id}")
        return page(
            request,
            "members.html",
            session,
            status,
            member=member,
            member_id=member_id,
            form_id=str(uuid.uuid4()),
            **extra,
        )

    @app.get("/members")
    async def members(request: Request) -> Response:
        session = await signed_in(request, Right.MEMBERS)
        return await member_page(
            request, session, request.query_params.get("member_id", "").strip()
        )

    @app.post("/members/lookup")
    async def find_member(request: Request) -> Response:
        session, form = await acting(request, Right.FIND_MEMBERS)
        kind = form.get("kind", "")
        value = form.get("value", "").strip()
        if kind not in ("phone", "member_number") or not value:
            return await member_page(request, session, "", 400, error_key="error.find")
        found = await call(
            session, Right.FIND_MEMBERS, "POST", "/v1/admin/members/lookup", json={kind: value}
        )
        # To the member's page by id: the identifier never enters a URL.
        return RedirectResponse(f"/members?member_id={found['member_id']}", status_code=303)

    @app.post("/members/{member_id}/unmask")
    async def unmask(request: Request, member_id: uuid.UUID) -> Response:
        session, form = await acting(request, Right.UNMASK)
        purpose = form.get("purpose", "").strip()
        if not purpose:
            return await member_page(
                request, session, str(member_id), 400, error_key="error.purpose"
            )
        pii = await call(
            session,
            Right.UNMASK,
            "GET",
            f"/v1/admin/members/{member_id}/pii",
            params={"purpose": purpose},
        )
        return await member_page(request, session, str(member_id), phone=pii.get("phone"))

    @app.post("/members/{member_id}/points-adjustments")
    async def adjust(request: Request, member_id: uuid.UUID) -> Response:
        session, form = await acting(request, Right.ADJUST_POINTS)
        try:
            points = int(form.get("points", ""))
        except ValueError:
            return await member_page(
                request, session, str(member_id), 400, error_key="error.points"
            )
        result = await call(
            session,
            Right.ADJUST_POINTS,
            "POST",
            f"/v1/admin/members/{member_id}/points/adjustments",
            json={
                "points": points,
                "reason": form.get("reason", "").strip(),
                # One per form shown: a double submit of the same form replays.
                "idempotency_key": form.get("form_id") or str(uuid.uuid4()),
            },
        )
        return await member_page(request, session, str(member_id), adjusted=result)

    # ---- coupons -------------------------------------------------------------------------

    @app.get("/coupons")
    async def coupons(request: Request) -> Response:
        session = await signed_in(request, Right.COUPONS)
        data = await call(
            session, Right.COUPONS, "GET", "/v1/admin/coupon-templates", params={"page_size": "100"}
        )
        return page(request, "coupons.html", session, templates_=data["templates"])

    @app.post("/coupons")
    async def create_coupon(request: Request) -> Response:
        session, form = await acting(request, Right.COUPONS)
        try:
            body = {
                "template_id": form.get("template_id", "").strip(),
                "terms": {
                    "name": form.get("name", "").strip(),
                    "kind": "amount_off",
                    "threshold_fen": fen_from_yuan(form.get("threshold_yuan", "0")),
                    "discount_fen": fen_from_yuan(form.get("discount_yuan", "0")),
                    "valid_days": int(form.get("valid_days", "30")),
                },
                "limits": {"total_stock": int(form.get("total_stock", "0"))},
                "status": "active" if form.get("status") == "active" else "draft",
            }
        except (ValueError, ArithmeticError):
            raise FormInvalid("INVALID_FORM", "error.form_amounts") from None
        await call(session, Right.COUPONS, "POST", "/v1/admin/coupon-templates", json=body)
        return RedirectResponse("/coupons", status_code=303)

    @app.post("/coupons/{template_id}/status")
    async def coupon_status(request: Request, template_id: str) -> Response:
        session, form = await acting(request, Right.COUPONS)
        await call(
            session,
            Right.COUPONS,
            "PUT",
            f"/v1/admin/coupon-templates/{segment(template_id)}/status",
            json={"status": form.get("status", "")},
        )
        return RedirectResponse("/coupons", status_code=303)

    @app.post("/coupons/{template_id}/stock")
    async def coupon_stock(request: Request, template_id: str) -> Response:
        session, form = await acting(request, Right.COUPONS)
        current_ = await call(
            session, Right.COUPONS, "GET", f"/v1/admin/coupon-templates/{segment(template_id)}"
        )
        limits = dict(current_["limits"])
        try:
            limits["total_stock"] = int(form.get("total_stock", ""))
        except ValueError:
            raise FormInvalid("INVALID_FORM", "error.total_stock") from None
        await call(
            session,
            Right.COUPONS,
            "PUT",
            f"/v1/admin/coupon-templates/{segment(template_id)}/limits",
            json=limits,
        )
        return RedirectResponse("/coupons", status_code=303)

    # ---- journeys ---------------------------------------------------------------------------

    @app.get("/journeys")
    async def journeys(request: Request) -> Response:
        session = await signed_in(request, Right.JOURNEYS)
        journey_id = request.query_params.get("journey_id", "").strip()
        page_token = request.query_params.get("page_token", "")
        listed = await call(
            session,
            Right.JOURNEYS,
            "GET",
            "/v1/admin/journeys",
            params={"page_size": "100", "page_token": page_token},
        )
        metrics = None
        if journey_id:
            metrics = await call(
                session, Right.JOURNEYS, "GET", f"/v1/admin/journeys/{segment(journey_id)}/metrics"
            )
        return page(
            request,
            "journeys.html",
            session,
            journey_id=journey_id,
            metrics=metrics,
            journeys=listed["journeys"],
            next_page_token=listed["next_page_token"] or "",
        )

    @app.post("/journeys")
    async def publish_journey(request: Request) -> Response:
        session, form = await acting(request, Right.JOURNEYS)
        try:
            definition = json.loads(form.get("definition", ""))
        except ValueError:
            raise FormInvalid("INVALID_JSON", "error.definition_json") from None
        reply = await call(session, Right.JOURNEYS, "POST", "/v1/admin/journeys", json=definition)
        journey_id = (reply or {}).get("journey_id", definition.get("journey_id", ""))
        return RedirectResponse(f"/journeys?journey_id={journey_id}", status_code=303)

    @app.post("/journeys/{journey_id}/{action}")
    async def journey_action(request: Request, journey_id: str, action: str) -> Response:
        session, _ = await acting(request, Right.JOURNEYS)
        if action not in ("pause", "resume"):
            raise Refused(404, "forbidden")
        await call(
            session, Right.JOURNEYS, "POST", f"/v1/admin/journeys/{segment(journey_id)}/{action}"
        )
        return RedirectResponse(f"/journeys?journey_id={journey_id}", status_code=303)

    # ---- parked events -------------------------------------------------------------------------

    @app.get("/events")
    async def events(request: Request) -> Response:
        session = await signed_in(request, Right.EVENTS)
        data = await call(session, Right.EVENTS, "GET", "/v1/admin/parked-events")
        return page(
            request,
            "events.html",
            session,
            events=data["events"],
            replayed=request.query_params.get("replayed"),
        )

    @app.post("/events/{member_id}/replay")
    async def replay(request: Request, member_id: uuid.UUID) -> Response:
        session, _ = await acting(request, Right.EVENTS)
        reply = await call(
            session, Right.EVENTS, "POST", f"/v1/admin/parked-events/{member_id}/replay"
        )
        return RedirectResponse(f"/events?replayed={reply['replayed']}", status_code=303)

    # ---- dead-lettered stream events -------------------------------------------------------------

    @app.get("/dead-letters")
    async def dead_letters(request: Request) -> Response:
        session = await signed_in(request, Right.DEAD_LETTERS)
        data = await call(session, Right.DEAD_LETTERS, "GET", "/v1/admin/dead-letters")
        return page(
            request,
            "dead_letters.html",
            session,
            letters=data["dead_letters"],
            redriven=request.query_params.get("redriven", ""),
        )

    @app.post("/dead-letters/redrive")
    async def redrive(request: Request) -> Response:
        session, form = await acting(request, Right.DEAD_LETTERS)
        reply = await call(
            session,
            Right.DEAD_LETTERS,
            "POST",
            "/v1/admin/dead-letters/redrive",
            json={k: form.get(k, "") for k in ("stream", "group", "id")},
        )
        return RedirectResponse(
            f"/dead-letters?redriven={quote(reply['published_id'])}", status_code=303
        )

    return app
