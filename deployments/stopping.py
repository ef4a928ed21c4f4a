"""Noticing that Serve has begun to stop this replica.

Serve 2.60 stops a replica (a redeploy, a scale-down, `serve.delete`) in three steps: it routes no
new requests to it, waits until the requests in flight have ended (looking every
`graceful_shutdown_wait_loop_s`), then calls the replica's `__del__`. At `graceful_shutdown_timeout_s`
it kills the replica whatever it is doing, and a stream cut that way reaches the client as a bare
internal error. User code gets no signal when the stop begins, so the LLM replica asks the
controller, which lists the replica as STOPPING from the first step on.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import ray
from ray import serve

logger = logging.getLogger("ray.serve")


async def wait_until_stopping(period_s: float, busy: Callable[[], bool]) -> None:
    """Returns once Serve's controller lists this replica as STOPPING. Asks every `period_s` while
    `busy()`: an idle replica drains at once without help."""
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    ctx = serve.get_replica_context()
    controller = None
    while True:
        await asyncio.sleep(period_s)
        if not busy():
            continue
        try:
            if controller is None:
                controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
            details = await controller.get_deployment_details.remote(ctx.app_name, ctx.deployment)
        except Exception as e:  # NOTE: a controller that restarts answers again soon; ask again then
            logger.debug("could not ask the controller for this replica's state: %s", e)
            controller = None
            continue
        if any(r.replica_id == ctx.replica_tag and r.state == "STOPPING" for r in details.replicas):
            return
