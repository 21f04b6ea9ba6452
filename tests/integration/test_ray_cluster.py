"""Ray Serve on a real two-node cluster (a head node and a second node, each started with `ray start` on
127.0.0.1 with a resource label of its own): two replicas on different nodes both serve, and when one
replica's process is killed, requests keep being answered and Ray replaces it."""

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.integration.conftest import TINY, serving

NODES = ({"head_node": 1}, {"second_node": 1})

REPLICAS = """
from ray.util.state import list_actors
labels = {node["NodeID"]: next(label for label in ("head_node", "second_node") if label in node["Resources"])
          for node in ray.nodes() if node["Alive"]}
result = sorted((labels[actor.node_id], actor.pid) for actor in list_actors(filters=[("state", "=", "ALIVE")])
                if actor.class_name == "ServeReplica:%s:%s")
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, model_store):
    options = {"nodes": NODES, "replicas": 2, "cpus_per_node": 1, "deploy_options": ("--max-replicas-per-node", "1"),
               "dashboard": True}
    with serving("ray", tmp_path_factory.mktemp("ray-nodes"), model_store, {TINY: f"{TINY}.mar"}, **options) as cluster:
        yield cluster


def replicas(cluster) -> list[tuple[str, int]]:
    """(node label, pid) of each live replica."""
    return [tuple(replica) for replica in cluster.state(REPLICAS % (TINY, TINY))]


def served_batches(cluster, pid: int) -> int:
    """Batches the replica with this pid ran, from its worker's log (Ray names the file after the pid)."""
    logs = cluster.temp_dir / "session_latest" / "logs"
    return sum(path.read_text(errors="replace").count("batch of ") for path in logs.glob(f"worker-*-{pid}.err"))


def post_concurrently(cluster, count: int) -> list[int]:
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda index: cluster.predict(TINY, json={"prompt": f"digit {index % 10}", "seed": index})
                             .status_code, range(count)))


def test_two_replicas_on_two_nodes_both_serve(cluster):
    placed = replicas(cluster)
    assert sorted(label for label, _ in placed) == ["head_node", "second_node"], placed
    assert post_concurrently(cluster, 24) == [200] * 24
    assert all(served_batches(cluster, pid) > 0 for _, pid in placed), {pid: served_batches(cluster, pid) for _, pid in placed}


KILLS = 3  # a kill between two batches catches no request in flight: the test kills again, up to this many times


def replaced(cluster, victim: int) -> list[tuple[str, int]]:
    """The replicas once Ray has replaced the victim (or what is there after 180 s)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        now = replicas(cluster)
        if len(now) == 2 and victim not in {pid for _, pid in now}:
            return now
        time.sleep(2)
    return replicas(cluster)


def test_a_killed_replica_is_replaced_and_requests_keep_being_answered(cluster):
    statuses, stop = [], threading.Event()

    def keep_asking(client: int):
        while not stop.is_set():
            statuses.append(cluster.predict(TINY, json={"prompt": f"digit {client}", "seed": client}).status_code)

    def resent() -> int:
        return cluster.replica_log().count("died (attempt 1 of 2)")

    # Four clients keep both replicas busy, so that a kill lands on requests in flight.
    clients = [threading.Thread(target=keep_asking, args=(client,)) for client in range(4)]
    for client in clients:
        client.start()
    kills = []
    try:
        while len(kills) < KILLS and resent() == 0:
            time.sleep(3)
            before = replicas(cluster)
            victim_node, victim = before[1]
            os.kill(victim, signal.SIGKILL)
            after = replaced(cluster, victim)
            kills.append((before, after))
            assert len(after) == 2 and victim not in {pid for _, pid in after}, (before, after)
            # One per node: the new replica took the dead one's place.
            assert victim_node in {label for label, _ in after}, (before, after)
        time.sleep(3)  # requests go on against the replaced replica set
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=330)
    print(f"kills (replicas before, after): {kills}; {len(statuses)} requests: {sorted(set(statuses))}; {resent()} resent")
    assert resent() > 0, f"none of {len(kills)} kills hit a request in flight, so this run shows nothing about them"
    assert statuses and all(status == 200 for status in statuses)  # those in flight went to the other replica
