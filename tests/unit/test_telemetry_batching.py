"""Counter increments on the request path are summed and recorded in batches, exactly."""

import asyncio

from deployments import telemetry
from serving import metrics as m


def test_counts_are_summed_per_label_set_and_flushed_once(monkeypatch):
    recorded = []
    monkeypatch.setattr(telemetry, "_inc", lambda spec, value, tags=None: recorded.append((spec.name, value, tags)))
    counts = telemetry._BatchedCounts(period_s=0.05)

    async def main():
        for _ in range(5):
            counts.add(m.HTTP_REQUESTS, {"endpoint": "/v1/completions", "status_code": "200"})
        counts.add(m.HTTP_REQUESTS, {"endpoint": "/v1/completions", "status_code": "400"})
        assert recorded == []  # nothing recorded on the request path
        await asyncio.sleep(0.2)

    asyncio.run(main())
    assert sorted(recorded) == [(m.HTTP_REQUESTS.name, 1, {"endpoint": "/v1/completions", "status_code": "400"}),
                                (m.HTTP_REQUESTS.name, 5, {"endpoint": "/v1/completions", "status_code": "200"})]
    counts.add(m.ERRORS, {"error_type": "x"})  # outside an event loop: recorded at once
    assert recorded[-1] == (m.ERRORS.name, 1, {"error_type": "x"})
