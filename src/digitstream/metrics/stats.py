"""``/api/stats``: everything the dashboard shows, as one JSON document."""

from __future__ import annotations

import dataclasses
import math

from digitstream.metrics.recorder import BATCH_SIZE_EDGES, Snapshot


def stats_document(
    snapshot: Snapshot, info: dict, window: int | None = None, since: float | None = None
) -> dict:
    """The ``/api/stats`` document. Times are in seconds, rates per second.

    Top-level fields:

    - ``name``: the application's ``--name``; ``version``: digitstream's version.
    - ``status``: ``"starting"``, ``"ready"`` or ``"stopping"``; ``ready``: bool (as ``/readyz``).
    - ``now``, ``started_at``: Unix times; ``uptime_seconds``.
    - ``engine``, ``input_format``, ``output_format``, ``addresses`` (``in``, ``out``, ``metrics``).
    - ``cluster``: with ``--engine dask``, where batches go now: ``{scheduler, local_cluster,
      connected, workers, reconnects, in_process_batches}``; with ``--engine local --workers
      N``: ``{worker_processes, in_process_batches, restarts, late_kills}``; else null.
    - ``pipeline_loaded``: false while skops loads the pipeline of a model served from
      its stored arrays (the rows near a tie wait for it), true otherwise.
    - ``pipeline``: stage names in order, e.g.
      ``["decode", "PCA", "Logistic Regression", "encode"]``.
    - ``messages``: ``in`` (frames received), ``out`` (results written), ``in_flight``
      (``in - out``), ``rejected`` (inputs answered with an error; counted in ``out``).
    - ``bytes``: ``in`` (payload bytes), ``out`` (result bytes, framing included).
    - ``throughput``: ``in_per_s``, ``out_per_s``, ``bytes_in_per_s``, ``bytes_out_per_s``
      over the last second; ``out_per_s_1m``: mean over the last minute; ``peak_out_per_s``
      in the history.
    - ``latency``: ``end_to_end`` (frame complete at the source to result written to the
      sink) and ``stages`` (stage name -> the time its batch spent in that stage), all
      workers together; each is ``{count, mean, max, p50, p95, p99, p99_9}`` in seconds
      (null while empty).
    - ``batches``: ``count``, ``mean_size``, ``sizes`` (``[{"le": 1, "count": n}, ...]``,
      powers of two; the last bucket's ``le`` is null, larger than every edge).
    - ``rejected``: reason -> count.
    - ``connections``: ``open``, ``total`` (accepted), ``errors`` (kind -> count).
    - ``connectors``: ``source`` and ``sink``, each present when its connector counts its
      entries (Redis Streams): ``{connector, where, counters, gauges}``, ``where`` as in
      ``addresses`` (password masked). A Redis source's ``counters``: ``read`` (new entries),
      ``redelivered`` (its own pending entries read again at start), ``claimed`` (taken over
      from idle consumers), ``acknowledged`` (by the source, for a sink other than Redis's),
      ``lost`` (not acknowledged: another consumer had taken them over), ``reconnects``; its
      ``gauges``: ``pending`` (read by this process, results not yet delivered) and
      ``group_pending`` (the whole group's pending entries, as XPENDING said within the
      last second). A Redis sink's ``counters``: ``committed`` (result entries added),
      ``acknowledged`` (input entries acknowledged with them), ``skipped`` (results not added:
      their entries had been taken over), ``reconnects``; ``gauges``: ``pending`` (results
      taken, not yet committed).
    - ``workers``: a list of ``{name, state ("active"|"lost"), joined_at, lost_at, messages,
      batches, out_per_s, latency: {end_to_end, stages}}``; ``worker_events``: the last
      100 ``{time, worker, event}``.
    - ``classes``: ``labels`` and ``counts`` of predicted classes (rejected inputs excluded).
    - ``accuracy``: from every label that reached the application, inline or late
      (``run --labels``): ``labelled``, ``correct``, ``accuracy`` (null until a label
      arrives), ``confusion``: ``{"labels": [...], "matrix": [[...]]}``, rows true, columns
      predicted; ``per_class`` (true label -> ``{labelled, correct, accuracy}``);
      ``window`` (``labelled``, ``correct``, ``accuracy``, ``seconds``: the labels that
      arrived in the last ``--drift-seconds``); ``estimated`` (``estimated_accuracy``, for
      comparison); ``drop`` (``detected``, ``since``, ``episodes``: an accuracy drop flagged
      by a change detector on the error rate).
    - ``labels``: late labels (``run --labels``): ``enabled``, ``received`` (well-formed
      records), ``matched`` (joined to a prediction), ``unknown`` (no prediction awaited that
      id), ``expired`` (predictions dropped, oldest first, past ``--label-window``),
      ``pending`` (predictions awaiting a label now), ``invalid`` (records that are not
      ``{"id", "label"}``), ``capacity``.
    - ``drift``: the model monitor's verdict on the current window (see
      :mod:`digitstream.monitor.drift`): ``enabled`` (false, with a ``reason``, without a
      reference profile or with ``--no-drift``), ``detected``, ``score`` (the largest of the
      tests' scores: standard deviations above the reference's own windows) and
      ``threshold``, ``since`` (Unix time drift was first seen, null while none),
      ``features`` (each input feature's Jensen-Shannon distance from the reference, in
      feature order), ``classes`` (the predicted classes' distance), ``window`` (messages in
      the window), ``rows`` (sampled rows in it), ``tests`` (``inputs``, ``classes``,
      ``confidence``: ``statistic``, ``n``, ``threshold``, ``score``), ``episodes`` (drifts
      detected so far), ``limits`` (``messages``, ``seconds``), ``image`` (``[height,
      width]`` when the features are a square image), ``history`` (``t``, ``score`` of the
      last 600 verdicts).
    - ``estimated_accuracy``: the accuracy expected over the drift window from the winning
      probabilities and the profile's calibration (confidence-based, no labels); null
      without a profile or probabilities.
    - ``shadow``: with ``run --shadow``, the shadow model scored off the served path (see
      :mod:`digitstream.monitor.shadow`): ``model`` (its card), ``path``, ``content_hash``,
      ``ready``, ``since`` (when this comparison started: at start, or when either model
      changed), ``offered_batches``, ``batches`` (scored by both), ``scored`` (messages scored
      by both), ``agreement`` (the share of those given the same class), ``disagreement``
      (``labels``, ``matrix``: served class x shadow class), ``labelled`` (labelled messages
      scored by both), ``served_accuracy`` and ``shadow_accuracy`` (on those; null until
      one), ``skipped_batches`` and ``skipped_messages`` (not scored: the shadow was full,
      not ready, or lost them), ``in_flight``, ``seconds_per_batch`` (``served``,
      ``shadow``), ``swaps``, ``restarts``; null without a shadow.
    - ``model``: the model card of the bundle (data set, held-out accuracy, step names,
      library versions, ...), as in its ``model.json``; after a swap, the new model's.
    - ``model_swaps``: the last 100 models swapped in while running, oldest first:
      ``{time, old_hash, new_hash, at}``, ``at`` mapping each open connection's id to the
      sequence number of its first message answered by the new model.
    - ``model_swaps_total``: how many models were swapped in while running (all of them,
      where ``model_swaps`` keeps the last 100).
    - ``model_swaps_refused``: how many bundles were refused; ``last_swap_refused``: the last
      refusal, ``{time, reason}`` (``reason`` as in the WARNING line), null until one. A
      refused bundle failed to load or check, and the old model served on.
    - ``swap_refusals``: the last 100 refusals, oldest first, each ``{time, reason}``.
    - ``history``: per-second samples, oldest first: the last ``window`` (default all 600),
      or only those after ``since`` (a ``t`` from an earlier answer) when given:
      ``interval_s``, and lists ``t``, ``in_per_s``, ``out_per_s``, ``bytes_in_per_s``,
      ``rejected_per_s``, ``latency_p50``, ``latency_p99`` (end to end, that second),
      ``workers`` (name -> list of out_per_s).
    """
    s = snapshot
    history = s.history
    if since is not None:
        start = len(history)
        while start and history[start - 1].t > since:
            start -= 1
        history = history[start:]
    if window is not None:
        history = history[-window:] if window else []
    last = s.history[-1] if s.history else None
    minute = s.history[-60:]
    stages = s.stages()
    sizes = s.batch_sizes()
    worker_rates = last.workers if last else {}
    labels = list(s.classes)
    for pair in s.confusion:
        for label in pair:
            if label not in labels:
                labels.append(label)
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for (true, predicted), count in s.confusion.items():
        matrix[index[true]][index[predicted]] += count
    return {
        "name": s.name,
        "version": info.get("version"),
        "status": s.status,
        "ready": s.ready,
        "now": s.taken_at,
        "started_at": s.started_at,
        "uptime_seconds": s.taken_at - s.started_at,
        "engine": info.get("engine"),
        "cluster": info.get("cluster"),
        "pipeline_loaded": info.get("pipeline_loaded", True),
        "input_format": info.get("input_format"),
        "output_format": info.get("output_format"),
        "addresses": info.get("addresses", {}),
        "pipeline": list(s.stage_names),
        "messages": {
            "in": s.messages_in,
            "out": s.messages_out,
            "in_flight": s.messages_in - s.messages_out,
            "rejected": sum(s.rejected.values()),
        },
        "bytes": {"in": s.bytes_in, "out": s.bytes_out},
        "throughput": {
            "in_per_s": last.messages_in if last else 0.0,
            "out_per_s": last.messages_out if last else 0.0,
            "bytes_in_per_s": last.bytes_in if last else 0.0,
            "bytes_out_per_s": last.bytes_out if last else 0.0,
            "out_per_s_1m": sum(x.messages_out for x in minute) / len(minute) if minute else 0.0,
            "peak_out_per_s": max((x.messages_out for x in s.history), default=0.0),
        },
        "latency": {
            "end_to_end": s.latency().summary(),
            "stages": {name: hist.summary() for name, hist in stages.items()},
        },
        "batches": {
            "count": s.batches,
            "mean_size": s.messages_out / s.batches if s.batches else None,
            "sizes": [
                {"le": BATCH_SIZE_EDGES[i] if i < len(BATCH_SIZE_EDGES) else None, "count": count}
                for i, count in enumerate(sizes)
            ],
        },
        "rejected": dict(sorted(s.rejected.items())),
        "connections": {
            "open": s.connections_open,
            "total": s.connections_total,
            "errors": dict(sorted(s.connection_errors.items())),
        },
        "connectors": s.connectors,
        "workers": [
            {
                "name": w.name,
                "state": w.state,
                "joined_at": w.joined_at,
                "lost_at": w.lost_at,
                "messages": w.messages,
                "batches": w.batches,
                "out_per_s": worker_rates.get(w.name, 0.0),
                "latency": {
                    "end_to_end": w.latency.summary(),
                    "stages": {
                        name: w.stages[name].summary() for name in _ordered(s.stage_names, w.stages)
                    },
                },
            }
            for w in s.workers
        ],
        "worker_events": s.worker_events,
        "classes": {"labels": list(s.classes), "counts": list(s.class_counts)},
        "accuracy": {
            "labelled": s.labelled,
            "correct": s.correct,
            "accuracy": s.correct / s.labelled if s.labelled else None,
            "confusion": {"labels": labels, "matrix": matrix},
            "per_class": _per_class(labels, matrix),
            **s.monitor.get("accuracy", {}),
            "estimated": s.monitor.get("estimated_accuracy"),
        },
        "labels": s.monitor.get("labels"),
        "shadow": _jsonable(s.monitor["shadow"]) if s.monitor.get("shadow") else None,
        "drift": s.monitor.get("drift"),
        "estimated_accuracy": s.monitor.get("estimated_accuracy"),
        "model": _jsonable(info.get("model") or {}),
        "model_swaps": s.model_swaps,
        "model_swaps_total": s.model_swaps_total,
        "model_swaps_refused": s.model_swaps_refused,
        "last_swap_refused": s.last_swap_refused,
        "swap_refusals": s.swap_refusals,
        "history": {
            "interval_s": 1,
            "t": [x.t for x in history],
            "in_per_s": [x.messages_in for x in history],
            "out_per_s": [x.messages_out for x in history],
            "bytes_in_per_s": [x.bytes_in for x in history],
            "rejected_per_s": [x.rejected for x in history],
            "latency_p50": [x.latency_p50 for x in history],
            "latency_p99": [x.latency_p99 for x in history],
            "workers": {
                name: [x.workers.get(name, 0.0) for x in history] for name in _worker_names(history)
            },
        },
    }


def _per_class(labels: list[str], matrix: list[list[int]]) -> dict:
    out = {}
    for i, label in enumerate(labels):
        labelled = sum(matrix[i])
        if labelled:
            correct = matrix[i][i]
            out[label] = {"labelled": labelled, "correct": correct, "accuracy": correct / labelled}
    return out


def _ordered(stage_names: list[str], present) -> list[str]:
    known = [name for name in stage_names if name in present]
    return known + [name for name in present if name not in stage_names]


def _worker_names(history) -> list[str]:
    names: dict[str, None] = {}
    for sample in history:
        if sample.workers.keys() - names.keys():
            names.update(dict.fromkeys(sample.workers))
    return list(names)


def _jsonable(value):
    """The model card as plain JSON (it may be a dataclass, and hold tuples or NaN)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return str(value)
