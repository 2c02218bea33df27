"""`python -m services.rewards` serves; `python -m services.rewards migrate` migrates.

Operator commands (against DATABASE_URL, one run each, safe to repeat):
  audit                 check every ledger invariant; exit 1 and list what fails
  expire                expire lapsed lots and activate due pending points
  announce-expiring     emit PointsExpiringSoon for lots lapsing soon
  void-timed-out-holds  void holds that were neither posted nor voided in time
  expire-coupons        mark lapsed coupons expired
  announce-expiring-coupons  emit CouponExpiringSoon for coupons lapsing soon
  release-unpaid-mall-exchanges  give back points and stock of points-plus-cash
                        exchanges whose payment did not arrive in time
  stores put|close|open|list   the brand's stores (operator-managed data)
  bulk-earn FILE --operator NAME   post a CSV of earns (member_id,points,reason,
                        idempotency_key[,occurred_at]) in chunks of 1,000; re-run safe
  partitions ensure [--ahead N]|list|detach NAME   the journal's time partitions
                        (made ahead; strays moved out of the default; detach refuses
                        what the ledger audit needs)
  checkpoint [--as-of YYYY-MM-01]   each member's balance at a month boundary: the
                        audit re-sums from it; journal partitions before it may go
"""

import sys

from servicekit.entrypoint import main

from .server import build

JOBS = (
    "audit",
    "expire",
    "announce-expiring",
    "void-timed-out-holds",
    "expire-coupons",
    "announce-expiring-coupons",
    "release-unpaid-mall-exchanges",
    "stores",
    "partitions",
    "checkpoint",
    "bulk-earn",
)

if len(sys.argv) > 1 and sys.argv[1] in JOBS:
    from .cli import run_job

    sys.exit(run_job(sys.argv[1], sys.argv[2:]))
main("rewards", build)
