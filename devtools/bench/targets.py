"""One way to say whether a target is met: a bound, a direction, and the measured value."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str
    direction: str  # "<=" or ">="
    bound: float

    def met(self, value: float) -> bool:
        return value <= self.bound if self.direction == "<=" else value >= self.bound

    def verdict(self, value: float | None) -> str:
        if value is None:
            return "not measured"
        return f"{'met' if self.met(value) else 'MISSED'} ({value:.4g} {self.direction} {self.bound:g})"


def targets_table(targets: list[Target], values: dict[str, float | None], heading: str = "target") -> list[str]:
    """A markdown table: each target with its verdict."""
    return [f"| {heading} | result |", "|---|---|",
            *(f"| {target.name} | {target.verdict(values.get(target.name))} |" for target in targets)]
