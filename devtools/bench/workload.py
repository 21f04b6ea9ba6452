"""What a suite measures: one settings type for every suite."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    """A model, the requests a suite sends it, and how many."""

    name: str
    archiver_args: tuple[str, ...] = ("--source", "digits")  # how our archive of the model is built
    size: int = 64  # image side
    steps: int = 25
    guidance: float = 7.5
    dtype: str = "float32"
    requests: int = 16  # per measured run
    rounds: int = 3  # interleaved rounds (the median is reported)
    target_s: float | None = None  # a latency target, where the suite has one
    anchors: str = ""  # published figures to compare against, where the suite has some
