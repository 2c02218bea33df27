"""Every provider fake configured alike for the tests, `make run` and the bench:
one WeChat app, one WeCom corp, one Aliyun access key, one push token, and the
demo templates, plus the engagement settings that point at them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.wechat_fake import FakeWeChat

from . import ProviderFakes
from .aliyun_sms import FakeAliyunSms
from .push import FakePush
from .wechat import FakeWeChatMessages
from .wecom import FakeWeCom

WECHAT_APP_ID = "wxfakeapp0001"
WECHAT_APP_SECRET = "fake-wechat-app-secret"
WECOM_CORP_ID = "wwfakecorp0001"
WECOM_CORP_SECRET = "fake-wecom-corp-secret"
SMS_KEY_ID = "LTAIfakekey0001"
SMS_KEY_SECRET = "fake-aliyun-key-secret"
SMS_SIGN_NAME = "茶饮会员"
PUSH_TOKEN = "fake-push-token"

# The demo templates each fake knows (the journeys of `make run` use them).
WECHAT_TEMPLATES = {
    "tmpl-points-expiring": ["thing1", "number2", "date3"],
    "tmpl-offer": ["thing1", "date2"],
}
SMS_TEMPLATES = {"SMS_POINTS_EXPIRING": ["points"], "SMS_OFFER": [], "SMS_TIER": ["tier"]}


@dataclass
class FakeStack:
    server: ProviderFakes
    wechat: FakeWeChatMessages
    wecom: FakeWeCom
    sms: FakeAliyunSms
    push: FakePush

    def settings(self) -> dict[str, Any]:
        """Engagement settings (lower-case names) that send through these fakes."""
        return engagement_settings(self.server.base_url)


def engagement_settings(base_url: str) -> dict[str, Any]:
    """The engagement settings that point every channel at fakes served at base_url."""
    return {
        "wechat_api_base": f"{base_url}/wechat",
        "wechat_app_id": WECHAT_APP_ID,
        "wechat_app_secret": WECHAT_APP_SECRET,
        "wecom_api_base": f"{base_url}/wecom",
        "wecom_corp_id": WECOM_CORP_ID,
        "wecom_corp_secret": WECOM_CORP_SECRET,
        # The sender of members without a guide (the non-strict fake's staff).
        "wecom_sender": "fake-staff",
        "sms_endpoint": f"{base_url}/sms/",
        "sms_access_key_id": SMS_KEY_ID,
        "sms_access_key_secret": SMS_KEY_SECRET,
        "sms_sign_name": SMS_SIGN_NAME,
        "app_push_endpoint": f"{base_url}/push/",
        "app_push_token": PUSH_TOKEN,
    }


def engagement_environment(base_url: str) -> dict[str, str]:
    """The same as environment variables (`make run`'s engagement process)."""
    return {k.upper(): str(v) for k, v in engagement_settings(base_url).items()}


def build_stack(
    clock: Callable[[], float] | None = None,
    strict: bool = True,
    report_url: str = "",
    host: str = "127.0.0.1",
    port: int = 0,
) -> FakeStack:
    """strict: WeChat credits must be granted and WeCom customers registered
    (tests); otherwise every openid has credit and every contact is a customer."""
    kw: dict[str, Any] = {"clock": clock} if clock is not None else {}
    wechat = FakeWeChatMessages(
        FakeWeChat(apps={WECHAT_APP_ID: WECHAT_APP_SECRET}, **kw),
        templates=dict(WECHAT_TEMPLATES),
        strict_credits=strict,
    )
    wecom = FakeWeCom({WECOM_CORP_ID: WECOM_CORP_SECRET}, customers={} if strict else None, **kw)
    sms = FakeAliyunSms(
        {SMS_KEY_ID: SMS_KEY_SECRET},
        {SMS_SIGN_NAME},
        dict(SMS_TEMPLATES),
        report_url=report_url,
        **kw,
    )
    push = FakePush(PUSH_TOKEN)
    server = ProviderFakes(
        {"wechat": wechat.app(), "wecom": wecom.app(), "sms": sms.app(), "push": push.app()},
        host=host,
        port=port,
    )
    return FakeStack(server, wechat, wecom, sms, push)
