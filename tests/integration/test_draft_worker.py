"""The draft worker (parallel/draft_worker.py): an actor in the placement group it is given; its
proposals over the socket equal a local `DraftRunner`'s; a failed round raises and leaves it serving;
once it is killed, `propose` raises at once instead of hanging."""

import time

import pytest
import ray
from ray.util.placement_group import placement_group, remove_placement_group

from parallel.draft_worker import start_draft_worker
from serving.models import default_draft_path
from serving.spec.draft import DraftRequest, DraftRunner

BLOCK_SIZE = 16
NUM_BLOCKS = 64

pytestmark = pytest.mark.skipif(default_draft_path() is None, reason="the embedded draft is not shipped")


def requests(k: int = 4) -> list[DraftRequest]:
    """Two prompts and a sampled request, each in blocks of its own."""
    return [DraftRequest(1, list(range(100, 120)), 0, list(range(1, 9)), k),
            DraftRequest(2, list(range(300, 307)), 0, list(range(9, 17)), k - 1),
            DraftRequest(3, list(range(500, 511)), 0, list(range(17, 25)), 2, temperature=1.0)]


@pytest.fixture
def draft(ray_cluster):
    """(placement group, actor, client), all gone after the test."""
    pg = placement_group([{"CPU": 1}])
    ray.get(pg.ready(), timeout=60)
    actor = client = None
    try:
        actor, client = start_draft_worker(default_draft_path(), "float32", NUM_BLOCKS, BLOCK_SIZE, "cpu",
                                           num_cpus=1, num_threads=1, placement_group=pg, bundle_index=0)
        yield pg, actor, client
    finally:
        if client is not None:
            client.close()
        if actor is not None:
            ray.kill(actor)
        remove_placement_group(pg)


def test_worker_proposes_as_a_local_runner_in_its_placement_group(draft):
    pg, actor, client = draft
    assert ray.get(actor.where.remote(), timeout=30)["placement_group_id"] == pg.id.hex()
    local = DraftRunner(default_draft_path(), "float32", NUM_BLOCKS, BLOCK_SIZE)
    reqs = requests()
    for _ in range(2):  # the second round overwrites the first's KV: same answers
        remote, expected = client.propose(reqs), local.propose(reqs)
        assert remote.tokens[:2] == expected.tokens[:2]  # greedy
        assert len(remote.tokens[2]) == 2 and remote.probs.shape == (2, 4096)
        assert remote.probs.device.type == "cpu" and remote.draft_time_s > 0
    ray.get(actor.ping.remote(), timeout=30)
    assert ray.get(actor.pid.remote(), timeout=30) == ray.get(actor.where.remote(), timeout=30)["pid"]


def test_a_failed_round_raises_and_the_worker_serves_on(draft):
    _, _, client = draft
    bad = [DraftRequest(1, [5, 6], 0, [1], k=0)]
    with pytest.raises(RuntimeError, match="draft worker failed the round"):
        client.propose(bad)
    assert len(client.propose(requests()).tokens) == 3


def test_propose_raises_soon_once_the_worker_is_killed(draft):
    _, actor, client = draft
    client.propose(requests())
    ray.kill(actor)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="draft worker"):
        for _ in range(100):  # NOTE: the first send may still reach a process on its way out
            client.propose(requests())
            time.sleep(0.05)
    assert time.monotonic() - t0 < 5.0
    with pytest.raises(RuntimeError, match="draft worker unusable"):
        client.propose(requests())
