"""The peak memory a server's worker adds while it serves: on a GPU, the device memory in use; on a CPU,
the workers' peak resident memory."""

import threading

import torch

from devtools.harness.torchserve import TorchServe, worker_hwm


class MemoryPeak:
    """The peak memory a worker adds to the device while it serves; on a CPU, its peak resident memory."""

    def __init__(self, device: torch.device, server: TorchServe):
        self.device, self.server = device, server
        self.baseline = self.peak = self.used()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def used(self) -> int:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            return total - free
        return max((worker_hwm(process.pid) for process in self.server.workers()), default=0)

    def sample(self) -> None:
        while not self.stopped.wait(0.2):
            self.peak = max(self.peak, self.used())

    def __enter__(self) -> "MemoryPeak":
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stopped.set()
        self.thread.join()

    @property
    def worker_bytes(self) -> int:
        return self.peak - self.baseline if self.device.type == "cuda" else self.peak
