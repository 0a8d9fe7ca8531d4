"""The metrics service's domain metrics (Prometheus): classifier runs and their cost."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

CLASSIFIER_RUNS = Counter(
    "metrics_classifier_runs_total",
    "Classifications computed, by label (insufficient_evidence when the gate stops them)",
    ["label"],
)
CLASSIFIER_SECONDS = Histogram(
    "metrics_classifier_duration_seconds",
    "Time to classify one window: gate, decision list and bootstrap",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
