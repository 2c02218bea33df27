"""gRPC servicer of the engagement service.

EngagementService has no RPCs yet: journeys, frequency caps and sends ARRIVE
WITH THE ENGAGEMENT ISSUE. The empty servicer is still registered, so health
and reflection list the service and clients can be wired from day one.
"""

from __future__ import annotations

from loyalty.engagement.v1 import engagement_pb2_grpc


class EngagementServicer(engagement_pb2_grpc.EngagementServiceServicer):
    """No methods yet; the RPCs will take the Database and open a unit of work each."""
