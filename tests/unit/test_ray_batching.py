"""Ray Serve's replicas form a batch when the pipeline is free, as TorchServe's frontend does for a worker:
requests that arrive while a batch runs make up the next one together, up to batchSize."""

import asyncio

import pytest

queues = pytest.importorskip("handlers.ray.queue", reason="the ray extra is not installed here")


def run_requests(arrivals: list[float], batch_size: int, batch_delay_s: float, batch_s: float) -> list[list[int]]:
    """The batches that requests arriving at these times (seconds) make, when each batch takes batch_s."""
    batches = []

    async def run_batch(batch):
        batches.append([queued.request for queued in batch])
        await asyncio.sleep(batch_s)
        return [f"answer {queued.request}" for queued in batch]

    async def main():
        queue = queues.BatchQueue(run_batch, batch_size, batch_delay_s)

        async def client(index, at):
            await asyncio.sleep(at)
            assert await queue.result(queues.QueuedRequest(index)) == f"answer {index}"

        await asyncio.gather(*(client(index, at) for index, at in enumerate(arrivals)))

    asyncio.run(main())
    return batches


def test_requests_arriving_while_a_batch_runs_make_the_next_batch_together():
    # One request starts a batch alone (1 ms delay); seven arrive while it runs.
    batches = run_requests([0] + [0.02 + 0.005 * index for index in range(7)], batch_size=4, batch_delay_s=0.001,
                           batch_s=0.4)
    assert batches == [[0], [1, 2, 3, 4], [5, 6, 7]]


def test_a_batch_waits_at_most_its_delay_for_more_requests():
    batches = run_requests([0, 0.05, 0.6], batch_size=4, batch_delay_s=0.25, batch_s=0.01)
    assert batches == [[0, 1], [2]]


def test_a_request_whose_client_left_is_not_generated():
    batches = []

    async def run_batch(batch):
        batches.append([queued.request for queued in batch])
        await asyncio.sleep(0.1)
        return [None] * len(batch)

    async def main():
        queue = queues.BatchQueue(run_batch, 4, 0.001)
        first = asyncio.ensure_future(queue.result(queues.QueuedRequest("first")))
        await asyncio.sleep(0.01)
        gone = asyncio.ensure_future(queue.result(queues.QueuedRequest("gone")))
        kept = asyncio.ensure_future(queue.result(queues.QueuedRequest("kept")))
        await asyncio.sleep(0.01)
        gone.cancel()  # its client disconnected while the first batch ran
        await asyncio.gather(first, kept)

    asyncio.run(main())
    assert batches == [["first"], ["kept"]]
