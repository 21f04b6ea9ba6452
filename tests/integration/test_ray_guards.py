"""Ray Serve's guards on a real cluster: every body is capped as it is read (a chunked upload declares no
length), and a replica that holds all it may queue answers 503 at once, through Serve's own
max_queued_requests, as TorchServe's job queue does."""

import json
import select
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from handlers.core.limits import MAX_REQUEST_BYTES
from handlers.ray.queue import max_ongoing
from tests.integration.conftest import TINY, serving

MAX_QUEUED = 2  # beyond what the one replica holds (max_ongoing of its batch of 4)
BATCH = 4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, model_store):
    options = {"replicas": 1, "app_args": {"max_queued_requests": MAX_QUEUED}}
    with serving("ray", tmp_path_factory.mktemp("ray-guards"), model_store, {TINY: f"{TINY}.mar"}, **options) as cluster:
        yield cluster


def chunked_upload(url_host: str, port: int, path: str, total: int, chunk: int = 1 << 20) -> tuple[int, bytes]:
    """POST total bytes as a chunked body, stopping when the server answers; the bytes sent, and the answer."""
    connection = socket.create_connection((url_host, port), timeout=60)
    connection.sendall(f"POST {path} HTTP/1.1\r\nHost: {url_host}\r\nContent-Type: application/json\r\n"
                       "Transfer-Encoding: chunked\r\n\r\n".encode())
    sent, piece = 0, b"[" * chunk
    try:
        while sent < total and not select.select([connection], [], [], 0)[0]:
            connection.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            sent += len(piece)
        if sent >= total:
            connection.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed while this was still sending
    answer = b""
    while chunk_read := connection.recv(65536):
        answer += chunk_read
        if b"\r\n\r\n" in answer and answer.rstrip().endswith(b"}"):
            break
    connection.close()
    return sent, answer


def test_a_chunked_body_past_the_limit_gets_413_having_been_read_no_further_than_the_cap(cluster):
    """Serve's proxy stops reading at the cap (handlers/ray/proxy.py): without it, it buffered 90 MiB of this
    upload while the ingress read its first 6.5 MB."""
    total = 100 * 2**20
    port = int(cluster.inference_url.rsplit(":", 1)[1])
    sent, answer = cluster.clients.submit(chunked_upload, "127.0.0.1", port, f"/predictions/{TINY}", total).result(timeout=300)
    head, _, body = answer.partition(b"\r\n\r\n")
    print(f"sent {sent / 2**20:.1f} MiB of {total / 2**20:.0f} MiB before the answer: {body[:200]!r}")
    assert b" 413 " in head.split(b"\r\n", 1)[0]
    assert json.loads(body)["allowed"] == {"max_request_bytes": MAX_REQUEST_BYTES}
    # What the client got into the socket: the cap, plus what the kernel's buffers held before the answer.
    assert sent <= MAX_REQUEST_BYTES + 8 * 2**20
    assert cluster.predict(TINY, json={"prompt": "digit 1"}).status_code == 200


def test_a_declared_length_past_the_limit_gets_413_before_any_body_is_read(cluster):
    response = cluster.predict(TINY, data=b"x" * (MAX_REQUEST_BYTES + 1), headers={"Content-Type": "text/plain"})
    assert response.status_code == 413 and response.json()["field"] == "body"


def test_a_full_replica_answers_503_at_once_and_the_rest_are_answered(cluster):
    held = max_ongoing(BATCH) + MAX_QUEUED
    sent = held + 4
    body = {"prompt": "digit 2", "num_inference_steps": 150}

    def timed(index: int):
        time.sleep(0.02 * index)  # in order, so the last ones find the replica full
        started = time.monotonic()
        response = cluster.predict(TINY, json=body)
        return response.status_code, time.monotonic() - started, response.json() if response.status_code != 200 else None

    with ThreadPoolExecutor(sent) as pool:
        outcomes = list(pool.map(timed, range(sent)))
    print([(status, round(seconds, 2)) for status, seconds, _ in outcomes])
    busy = [(seconds, error) for status, seconds, error in outcomes if status == 503]
    answered = [seconds for status, seconds, _ in outcomes if status == 200]
    assert busy and len(busy) + len(answered) == sent
    assert all("queue is full" in error["error"] for _, error in busy)
    assert max(seconds for seconds, _ in busy) < 2 < max(answered)  # refused at once; the others waited for their turn
