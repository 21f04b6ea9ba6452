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


def test_the_step_loop_lets_requests_join_between_steps_and_drops_departed_ones(tiny_pipeline_dir):
    """A replica's StepLoop on the tiny pipeline: a short request that arrives while a long one runs finishes
    first; one whose client goes away is dropped and forgotten; the ledger hears of every start and end."""
    from concurrent.futures import ThreadPoolExecutor

    from handlers.core.config import HandlerConfig
    from handlers.core.schema import GenerationRequest
    from handlers.core.service import DiffusionService
    from handlers.ray.steps import StepLoop

    service = DiffusionService(tiny_pipeline_dir, HandlerConfig(height=64, width=64, batching="step"))
    started, forgotten, finished = [], [], []

    async def main():
        loop = StepLoop(service, ThreadPoolExecutor(1), 4, started.extend, forgotten.extend)

        async def client(name: str, steps: int, at: float):
            await asyncio.sleep(at)
            queued = queues.QueuedRequest(GenerationRequest(prompt=name, num_inference_steps=steps, height=64, width=64),
                                          name, asyncio.Queue())
            await loop.result(queued)
            finished.append(name)

        departing = asyncio.ensure_future(client("departs", 150, 0))
        clients = asyncio.gather(client("long", 40, 0), client("short", 2, 0.1))
        await asyncio.sleep(0.2)
        departing.cancel()
        await clients
        assert len(loop.running_set) == 0 and not loop.running

    asyncio.run(main())
    assert finished == ["short", "long"]
    assert sorted(started) == sorted(forgotten) == ["departs", "long", "short"]
