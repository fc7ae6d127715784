"""Owns ``/metrics``: the station in Prometheus' text format (prometheus-client).

Everything is read when scraped, nothing is kept in the process: counters and histograms
are the index's daily sums over all days (``dts.index``, ``dts_daily``), gauges the
spool as it is now (queue counts and oldest ages, free disk, services alive). A scrape
costs one grouped query of a small table and a listing of the queue folders.

Metric names (prefix ``dts_``):

=======================================  =========  ===========================================
``instances_received_total``             counter    instances in published studies
``studies_received_total``               counter    studies published to classify/
``instances_refused_total{status}``      counter    instances answered with a failure status
``associations_refused_total``           counter    associations refused (allow-lists, limit)
``failures_total{stage,event}``          counter    jobs failed, internal errors, publications
``deliveries_total{status}``             counter    jobs delivered (ok) or given up (failed)
``events_total{stage,status}``           counter    journal lines
``stage_duration_seconds{stage}``        histogram  run durations; send: the try that delivered
``turnaround_seconds``                   histogram  last instance received -> delivered
``jobs{queue,state}``                    gauge      jobs in each queue now
``queue_oldest_seconds{queue}``          gauge      age of each queue's oldest job
``free_disk_bytes``                      gauge      free space on the spool's filesystem
``service_up{service}``                  gauge      1 while the service's pid lock is held
=======================================  =========  ===========================================
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .index import BUCKETS, Index, _le
from .station import Station
from .status import queue_counts, service_state

SERVICES = ("receiver", "watch", "classify", "run", "send")
COUNTERS = {
    "instances_received": ("instances in published studies", ()),
    "studies_received": ("studies published to classify/", ()),
    "instances_refused": ("instances answered with a failure status", ("status",)),
    "associations_refused": ("associations refused", ()),
    "failures": ("failed jobs, internal errors and publications", ("stage", "event")),
    "deliveries": ("jobs delivered (ok) or given up (failed)", ("status",)),
    "events_by": ("journal lines", ("stage", "status")),
}
HISTOGRAMS = {
    "stage_duration_seconds": ("time a stage took for one job", ("stage",)),
    "turnaround_seconds": ("last instance received to last result delivered", ()),
}


def _labels(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split(",") if "=" in part)


class _Collector:
    def __init__(self, station: Station, index: Index) -> None:
        self.station = station
        self.index = index

    def collect(self) -> Iterator[Metric]:
        totals = self.index.totals()
        for metric, (doc, names) in COUNTERS.items():
            name = "events" if metric == "events_by" else metric
            family = CounterMetricFamily(f"dts_{name}", doc, labels=list(names))
            rows = [(labels, v) for (m, labels), v in totals.items() if m == metric]
            if not names and not rows:
                rows = [("", 0.0)]
            for labels, value in sorted(rows):
                got = _labels(labels)
                family.add_metric([got.get(n, "") for n in names], value)
            yield family
        for metric, (doc, names) in HISTOGRAMS.items():
            hist = HistogramMetricFamily(f"dts_{metric}", doc, labels=list(names))
            groups: dict[str, dict[str, Any]] = {}
            for (m, labels), value in totals.items():
                if not m.startswith(metric + "_"):
                    continue
                part = m[len(metric) + 1:]
                got = _labels(labels)
                le = got.pop("le", None)
                key = ",".join(f"{k}={got[k]}" for k in sorted(got))
                g = groups.setdefault(key, {"buckets": {}, "sum": 0.0, "labels": got})
                if part == "bucket" and le is not None:
                    g["buckets"][le] = value
                elif part == "sum":
                    g["sum"] = value
            for g in groups.values():
                buckets = [(_le(b), g["buckets"].get(_le(b), 0.0)) for b in BUCKETS]
                hist.add_metric([g["labels"].get(n, "") for n in names], buckets,
                               g["sum"])
            yield hist
        spool = self.index.spool
        jobs = GaugeMetricFamily("dts_jobs", "jobs in each queue now", labels=["queue", "state"])
        oldest = GaugeMetricFamily("dts_queue_oldest_seconds", "age of the oldest job",
                                   labels=["queue"])
        for queue, counts in queue_counts(spool).items():
            if queue == "incoming":
                jobs.add_metric([queue, "receiving"], counts.get("studies", 0))
                continue
            for state in ("new", "cur", "slurm", "count"):
                if state in counts:
                    jobs.add_metric([queue, "" if state == "count" else state], counts[state])
            if counts.get("oldest_seconds") is not None:
                oldest.add_metric([queue], counts["oldest_seconds"])
        yield jobs
        yield oldest
        free = GaugeMetricFamily("dts_free_disk_bytes", "free space on the spool's filesystem")
        try:
            free.add_metric([], spool.free_mb() * 1024 * 1024)
        except OSError:
            pass
        yield free
        up = GaugeMetricFamily("dts_service_up", "1 while the service runs", labels=["service"])
        for name in SERVICES:
            up.add_metric([name], 1.0 if service_state(spool, name).get("running") else 0.0)
        yield up


def render(station: Station, index: Index) -> tuple[bytes, str]:
    """The text of ``/metrics`` and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(station, index))  # type: ignore[arg-type]
    return generate_latest(registry), CONTENT_TYPE_LATEST
