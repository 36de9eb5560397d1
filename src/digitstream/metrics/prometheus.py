"""``/metrics``: the recorder's counters in Prometheus text format.

A custom collector turns one :class:`~digitstream.metrics.recorder.Snapshot`
into metric families at scrape time, so no ``prometheus_client`` object sits on
the hot path. Every name starts with ``digitstream_``:

==========================================  =========  ======================================
name                                        type       labels
==========================================  =========  ======================================
``digitstream_messages_total``              counter    ``stage`` (``source``, each pipeline
                                                       stage, ``sink``), ``worker``
``digitstream_received_bytes_total``        counter
``digitstream_sent_bytes_total``            counter
``digitstream_batches_total``               counter    ``worker``
``digitstream_batch_size``                  histogram  ``worker`` (messages per batch)
``digitstream_latency_seconds``             histogram  ``stage`` (``end_to_end`` or a
                                                       pipeline stage), ``worker``
``digitstream_rejected_total``              counter    ``reason``
``digitstream_connections_open``            gauge
``digitstream_connections_total``           counter
``digitstream_connection_errors_total``     counter    ``kind``
``digitstream_predictions_total``           counter    ``class``
``digitstream_labelled_total``              counter    (inputs that carried a true label)
``digitstream_correct_total``               counter    (... classified as labelled)
``digitstream_confusion_total``             counter    ``label``, ``predicted``
``digitstream_worker_up``                   gauge      ``worker``
``digitstream_ready``                       gauge
``digitstream_start_time_seconds``          gauge
``digitstream_model_info``                  info       data set, model, steps, versions
``digitstream_model_held_out_accuracy``     gauge
``digitstream_model_swaps_total``           counter    (models swapped in while running)
``digitstream_model_swaps_refused_total``   counter    (bundles refused: the old model serves on)
``digitstream_connector_entries_total``     counter    ``role`` (``source``, ``sink``),
                                                       ``connector``, ``event`` (``read``,
                                                       ``claimed``, ``committed``, ...)
``digitstream_connector_pending_entries``   gauge      ``role``, ``connector``, ``state``
                                                       (``pending``, ``group_pending``)
``digitstream_drift_score``                 gauge      ``feature`` (its index): the feature's
                                                       Jensen-Shannon distance from the
                                                       reference, over the drift window
``digitstream_drift_detected``              gauge      (1 while drift is detected)
``digitstream_drift_overall_score``         gauge      (the verdict's score ...)
``digitstream_drift_threshold``             gauge      (... and its threshold)
``digitstream_drift_classes_score``         gauge      (the predicted classes' distance)
``digitstream_drift_window_messages``       gauge
``digitstream_estimated_accuracy``          gauge      (confidence-based, without labels)
``digitstream_labels_total``                counter    ``event`` (``received``, ``matched``,
                                                       ``unknown``, ``expired``, ``invalid``)
``digitstream_labels_pending``              gauge      (predictions awaiting a late label)
``digitstream_window_accuracy``             gauge      (over the labels of the last window)
``digitstream_accuracy_drop_detected``      gauge      (1 while an accuracy drop is flagged)
``digitstream_shadow_scored_total``         counter    (messages both models scored)
``digitstream_shadow_agreement``            gauge      (the share of those given one class)
``digitstream_shadow_skipped_batches_total`` counter   (batches the shadow did not score)
``digitstream_shadow_accuracy``             gauge      ``model`` (``served``, ``shadow``), on
                                                       labelled messages both scored
==========================================  =========  ======================================

plus ``process_*`` and ``python_*`` from ``prometheus_client``'s own collectors.
``worker`` is who computed a batch: the application's ``--name`` with the local
engine, a Dask worker's name with ``--engine dask``; ``stage="source"`` is
counted under the application's name, as the source is in its process.
Latency is from a frame being complete at the source to its result written to
the sink; a stage's latency is the time its batch spent in that stage. Stages
do not add up to end to end (queueing is in end to end only), so do not sum
over ``stage``.
"""

from __future__ import annotations

from itertools import accumulate

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.utils import floatToGoString

from digitstream.metrics.recorder import (
    BATCH_SIZE_EDGES,
    BUCKETS_PER_DECADE,
    END_TO_END,
    LATENCY_EDGES,
    Histogram,
    Metrics,
)

#: Prometheus gets every 4th recorder bucket (12 per decade, ~21% wide): enough
#: for histogram_quantile, and a quarter of the series. The recorder keeps the
#: fine ones for the dashboard's percentiles.
EXPORT_STEP = 4
assert BUCKETS_PER_DECADE % EXPORT_STEP == 0
_EXPORT_INDEXES = range(0, len(LATENCY_EDGES), EXPORT_STEP)
_EXPORT_LE = [floatToGoString(LATENCY_EDGES[i]) for i in _EXPORT_INDEXES]
_BATCH_LE = [floatToGoString(edge) for edge in BATCH_SIZE_EDGES]

__all__ = ["CONTENT_TYPE_LATEST", "StreamCollector", "make_registry", "render"]


def _latency_buckets(hist: Histogram) -> list[tuple[str, int]]:
    cumulative = list(accumulate(hist.counts))
    buckets = [(le, cumulative[i]) for le, i in zip(_EXPORT_LE, _EXPORT_INDEXES)]
    buckets.append(("+Inf", hist.count))
    return buckets


def _batch_buckets(counts: list[int]) -> list[tuple[str, int]]:
    cumulative = list(accumulate(counts))
    buckets = list(zip(_BATCH_LE, cumulative))
    buckets.append(("+Inf", cumulative[-1]))
    return buckets


class StreamCollector:
    """Collects the application's measurements: ``metrics`` and, if given, its model card
    (a dict, or a function returning the card of the model serving now)."""

    def __init__(self, metrics: Metrics, card=None):
        self.metrics = metrics
        self.card = card or {}

    def describe(self):
        # empty: names depend on the pipeline's stages, so they are only known at scrape time
        return []

    def collect(self):
        s = self.metrics.snapshot(history=False)

        messages = CounterMetricFamily(
            "digitstream_messages", "Messages that passed each stage.", labels=["stage", "worker"]
        )
        messages.add_metric(["source", s.name], s.messages_in)
        latency = HistogramMetricFamily(
            "digitstream_latency_seconds",
            "Latency per message: end_to_end from frame complete to result written, or per stage.",
            labels=["stage", "worker"],
        )
        batches = CounterMetricFamily(
            "digitstream_batches", "Batches processed.", labels=["worker"]
        )
        batch_size = HistogramMetricFamily(
            "digitstream_batch_size", "Messages per batch.", labels=["worker"]
        )
        up = GaugeMetricFamily(
            "digitstream_worker_up", "1 while a worker is active, 0 once lost.", labels=["worker"]
        )
        for w in s.workers:
            stages = sorted(w.stages.items(), key=lambda kv: _stage_order(s.stage_names, kv[0]))
            for stage, hist in stages:
                messages.add_metric([stage, w.name], hist.count)
            latency.add_metric([END_TO_END, w.name], _latency_buckets(w.latency), w.latency.sum)
            for stage, hist in stages:
                latency.add_metric([stage, w.name], _latency_buckets(hist), hist.sum)
            batches.add_metric([w.name], w.batches)
            batch_size.add_metric([w.name], _batch_buckets(w.batch_sizes), w.messages)
            up.add_metric([w.name], 1 if w.state == "active" else 0)
        sink_by_worker = {w.name: w.messages for w in s.workers}
        for worker, count in sink_by_worker.items():
            messages.add_metric(["sink", worker], count)
        yield from (messages, latency, batches, batch_size, up)

        yield CounterMetricFamily(
            "digitstream_received_bytes", "Payload bytes received.", value=s.bytes_in
        )
        yield CounterMetricFamily(
            "digitstream_sent_bytes", "Result bytes sent, framing included.", value=s.bytes_out
        )
        rejected = CounterMetricFamily(
            "digitstream_rejected",
            "Inputs answered with an error instead of a class.",
            labels=["reason"],
        )
        for reason, count in sorted(s.rejected.items()):
            rejected.add_metric([reason], count)
        yield rejected
        yield GaugeMetricFamily(
            "digitstream_connections_open", "Source connections open now.", value=s.connections_open
        )
        yield CounterMetricFamily(
            "digitstream_connections", "Source connections accepted.", value=s.connections_total
        )
        errors = CounterMetricFamily(
            "digitstream_connection_errors", "Source connections that ended badly.", labels=["kind"]
        )
        for kind, count in sorted(s.connection_errors.items()):
            errors.add_metric([kind], count)
        yield errors

        predictions = CounterMetricFamily(
            "digitstream_predictions", "Predicted classes.", labels=["class"]
        )
        for label, count in zip(s.classes, s.class_counts):
            predictions.add_metric([label], count)
        yield predictions
        yield CounterMetricFamily(
            "digitstream_labelled", "Inputs that carried a true label.", value=s.labelled
        )
        yield CounterMetricFamily(
            "digitstream_correct", "Labelled inputs classified as labelled.", value=s.correct
        )
        confusion = CounterMetricFamily(
            "digitstream_confusion",
            "Labelled inputs by true label and predicted class.",
            labels=["label", "predicted"],
        )
        for (label, predicted), count in sorted(s.confusion.items()):
            confusion.add_metric([label, predicted], count)
        yield confusion

        yield GaugeMetricFamily(
            "digitstream_ready",
            "1 once the model is loaded and the source listens, 0 while stopping.",
            value=1 if s.ready else 0,
        )
        yield GaugeMetricFamily(
            "digitstream_start_time_seconds",
            "When the application started, in seconds since the epoch.",
            value=s.started_at,
        )
        yield CounterMetricFamily(
            "digitstream_model_swaps", "Models swapped in while running.", value=s.model_swaps_total
        )
        yield CounterMetricFamily(
            "digitstream_model_swaps_refused",
            "Bundles not swapped in (they failed to load or check).",
            value=s.model_swaps_refused,
        )
        entries = CounterMetricFamily(
            "digitstream_connector_entries",
            "Entries of a connector that counts them (Redis Streams), by what happened to them.",
            labels=["role", "connector", "event"],
        )
        now = GaugeMetricFamily(
            "digitstream_connector_pending_entries",
            "Entries of a connector held now: by this process, or by its consumer group.",
            labels=["role", "connector", "state"],
        )
        for role, report in sorted(s.connectors.items()):
            for event, count in sorted(report.get("counters", {}).items()):
                entries.add_metric([role, report.get("connector", ""), event], count)
            for state, value in sorted(report.get("gauges", {}).items()):
                now.add_metric([role, report.get("connector", ""), state], value)
        if s.connectors:
            yield entries
            yield now
        yield from _monitor_families(s.monitor)
        card = self.card() if callable(self.card) else self.card
        if card:
            info = InfoMetricFamily("digitstream_model", "The model being served.")
            info.add_metric([], _card_labels(card))
            yield info
            accuracy = _held_out_accuracy(card)
            if accuracy is not None:
                yield GaugeMetricFamily(
                    "digitstream_model_held_out_accuracy",
                    "The model's accuracy on data held out from training.",
                    value=accuracy,
                )


def _monitor_families(monitor: dict):
    labels = monitor.get("labels")
    if labels and labels.get("enabled"):
        events = CounterMetricFamily(
            "digitstream_labels", "Late label records, by what became of them.", labels=["event"]
        )
        for event in ("received", "matched", "unknown", "expired", "invalid"):
            events.add_metric([event], labels[event])
        yield events
        yield GaugeMetricFamily(
            "digitstream_labels_pending",
            "Predictions awaiting a late label.",
            value=labels["pending"],
        )
    accuracy = monitor.get("accuracy")
    if accuracy:
        if accuracy["window"]["accuracy"] is not None:
            yield GaugeMetricFamily(
                "digitstream_window_accuracy",
                "Accuracy over the labels (inline or late) of the last window.",
                value=accuracy["window"]["accuracy"],
            )
        yield GaugeMetricFamily(
            "digitstream_accuracy_drop_detected",
            "1 while a change detector on the error rate flags an accuracy drop.",
            value=1 if accuracy["drop"]["detected"] else 0,
        )
    shadow = monitor.get("shadow")
    if shadow:
        yield CounterMetricFamily(
            "digitstream_shadow_scored",
            "Messages scored by both the served and the shadow model (since either changed).",
            value=shadow["scored"],
        )
        yield CounterMetricFamily(
            "digitstream_shadow_skipped_batches",
            "Batches the shadow model did not score (full, not ready, or lost them).",
            value=shadow["skipped_batches"],
        )
        if shadow["agreement"] is not None:
            yield GaugeMetricFamily(
                "digitstream_shadow_agreement",
                "The share of messages both models scored that they gave the same class.",
                value=shadow["agreement"],
            )
        if shadow["labelled"]:
            both = GaugeMetricFamily(
                "digitstream_shadow_accuracy",
                "Accuracy on the labelled messages both models scored.",
                labels=["model"],
            )
            both.add_metric(["served"], shadow["served_accuracy"])
            both.add_metric(["shadow"], shadow["shadow_accuracy"])
            yield both
    drift = monitor.get("drift")
    if not drift:
        return
    yield GaugeMetricFamily(
        "digitstream_drift_detected",
        "1 while the model monitor sees drift from the reference profile, else 0.",
        value=1 if drift["detected"] else 0,
    )
    if not drift.get("enabled"):
        return
    scores = GaugeMetricFamily(
        "digitstream_drift_score",
        "Each input feature's Jensen-Shannon distance from the reference, over the window.",
        labels=["feature"],
    )
    for feature, score in enumerate(drift["features"]):
        scores.add_metric([str(feature)], score)
    yield scores
    for name, key, text in (
        (
            "overall_score",
            "score",
            "The drift verdict's score: standard deviations above "
            "the reference's own windows, the largest of the tests'.",
        ),
        ("threshold", "threshold", "The score above which drift is detected."),
        ("classes_score", "classes", "The predicted classes' distance from the reference."),
        ("window_messages", "window", "Messages in the drift window."),
    ):
        if drift.get(key) is not None:
            yield GaugeMetricFamily(f"digitstream_drift_{name}", text, value=drift[key])
    if monitor.get("estimated_accuracy") is not None:
        yield GaugeMetricFamily(
            "digitstream_estimated_accuracy",
            "Accuracy expected over the drift window from the winning probabilities (no labels).",
            value=monitor["estimated_accuracy"],
        )


def _held_out_accuracy(card: dict) -> float | None:
    for key in ("heldout_accuracy", "held_out_accuracy"):
        if isinstance(card.get(key), (int, float)):
            return card[key]
    return None


def _stage_order(stage_names: list[str], stage: str) -> int:
    try:
        return stage_names.index(stage)
    except ValueError:
        return len(stage_names)


def _card_labels(card: dict) -> dict[str, str]:
    labels = {}
    for key, value in card.items():
        if isinstance(value, (str, int, float, bool)):
            labels[key] = str(value)
        elif isinstance(value, (list, tuple)) and all(
            isinstance(v, (str, int, float)) for v in value
        ):
            labels[key] = ",".join(map(str, value))
        elif isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, (str, int, float, bool)):
                    labels[f"{key}_{k}"] = str(v)
    return {_label_name(k): v for k, v in labels.items() if len(v) <= 200}


def _label_name(key: str) -> str:
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in str(key))
    return name if name and not name[0].isdigit() else f"_{name}"


def make_registry(metrics: Metrics, card=None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StreamCollector(metrics, card))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
