"""A target an issue set, as the benchmark report shows it: met, missed (with the measured number
and the reason), or not measured yet."""

from __future__ import annotations

from dataclasses import dataclass

NOT_ANALYSED = "not analysed yet (no explanation recorded in benchmarks/targets.py or benchmarks/targets_runtime.py)"


@dataclass
class Target:
    area: str
    text: str
    source: str
    measured: str = "-"
    status: str = "not measured yet"        # met | missed | not measured yet
    reason: str = ""


def judged(ok: bool) -> str:
    return "met" if ok else "missed"
