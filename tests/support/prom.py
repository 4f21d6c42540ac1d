"""Reading Ray's Prometheus endpoints in tests."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Sample:
    name: str  # as scraped, with _total/_bucket/_sum/_count
    labels: dict[str, str]
    value: float


@dataclass(frozen=True)
class Scrape:
    samples: list[Sample]
    families: set[str]  # family names as scraped (e.g. ray_x_total's family is ray_x)

    def names(self) -> set[str]:
        """Every series name the scrape holds, families included."""
        return {s.name for s in self.samples} | self.families

    def total(self, name: str, **labels: str) -> float:
        """The sum of `name` over every series whose labels include `labels`."""
        return sum(
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def series(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.name == name]


def scrape(urls: Iterable[str]) -> Scrape:
    samples: list[Sample] = []
    families: set[str] = set()
    for url in urls:
        text = httpx.get(url, timeout=10).text
        for family in text_string_to_metric_families(text):
            families.add(family.name)
            samples.extend(Sample(s.name, dict(s.labels), float(s.value)) for s in family.samples)
    return Scrape(samples, families)


def wait_for(
    urls: Callable[[], list[str]], ready: Callable[[Scrape], bool], timeout_s: float = 45.0
) -> Scrape:
    """Scrape until `ready` holds (Ray exports metrics every second or so)."""
    deadline = time.monotonic() + timeout_s
    while True:
        current = scrape(urls())
        if ready(current) or time.monotonic() > deadline:
            return current
        time.sleep(1.0)
