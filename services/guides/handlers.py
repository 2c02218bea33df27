"""The guides service's use cases, each given a unit of work (or the Database
when a use case must call WeCom between transactions); business code never
commits. GuidesHandlers composes one class per subject, each in its own
module on the shared base (handlers_common.py):

  staff_handlers.py        the staff directory, its WeCom sync, resigning with transfer
  binding_handlers.py      the exclusive guide: first binding, rebinding, reassigning
  callback_handlers.py     WeCom's callbacks: verify, store, process
  attribution_handlers.py  orders attributed to guides, refunds, daily and funnel reports
  tag_handlers.py          manual, journey and rule tags; marking them on WeCom
  merge_handlers.py        OneID merges and unmerges
  workstation_handlers.py  the guide's sidebar: session, member view, tags, notes
  grant_handlers.py        coupon budgets and grants
  community_handlers.py    WeCom customer groups
  task_handlers.py         guide tasks from journeys

The servicer, the consumers and the jobs call GuidesHandlers only.
"""

from __future__ import annotations

from .attribution_handlers import AttributionHandlers
from .callback_handlers import CallbackHandlers
from .community_handlers import CommunityHandlers
from .grant_handlers import GrantHandlers
from .handlers_common import Clock
from .merge_handlers import MergeHandlers
from .task_handlers import TaskHandlers

__all__ = ["Clock", "GuidesHandlers"]


class GuidesHandlers(
    CallbackHandlers,
    AttributionHandlers,
    MergeHandlers,
    GrantHandlers,
    CommunityHandlers,
    TaskHandlers,
):
    """Every use case the servicer, consumers and jobs call, on one configuration."""
