"""The Dask engine: batches are classified on the workers of a Dask cluster.

::

    run process                          scheduler                 each worker
    source -> Batch --task------------>  keeps the task  -------->  Flow.process
    sink  <- BatchResult <-------------  result  <-----------------'  (model loaded once)

The source, the sink and the metrics stay in the ``run`` process; only the
scheduler's port needs to be reachable from it.

**The model.** The bundle's files travel once, inside a worker plugin
(:class:`ModelPlugin`). The scheduler keeps the plugin and hands it to every
worker, including workers that join later, so no worker needs a shared disk,
only digitstream installed. A worker writes the files to its local directory
and loads them with the same loader as ``run`` (skops, untrusted types
refused, content hash checked): the model is never unpickled. It is loaded
once per worker process and kept, keyed by its content hash. A model swapped
in while running (:meth:`DaskEngine.set_flow`) travels the same way, in a
plugin of its own; each batch names the hash of the model serving when it was
submitted, and the old model's plugin is dropped once its last batch is
answered.

**A batch** is one task whose key is unique to (run, stream, first sequence
number). Its payloads go as one array (or one bytes blob and a lengths
array), never as a Python object per message. The task is a pure function of
its arguments, which the scheduler holds until the result is taken: when a
worker dies, the scheduler runs the task again elsewhere, and the application
still receives exactly one result per batch. The application awaits results
per stream in submission order, so the output keeps its order whichever
worker finishes first.

**Back-pressure.** :meth:`DaskEngine.submit` waits while ``in_flight x
workers`` batches are out; the application's read loop waits on it, so the
source stops reading when the cluster falls behind. The limit follows the
workers as they join and leave; with no worker left it is zero: reading stops
until a worker joins (the batches already sent wait their deadline, below, and
are then computed here).

**A batch late.** A worker killed is noticed by the scheduler at once; a
worker whose host drops off the network is not: its connections go quiet, and
Dask waits for TCP to give up (30 s by default, 11 s at the least) or for the
worker's heartbeats to be missed (``worker-ttl``, 5 s at the least, checked
that often), while the stream, kept in order, waits for that worker's batch.
So every batch has a deadline: ``batch_deadline`` (2 s by default), or four
times the recent round trip of a batch if that is longer, so that a cluster
slow for every batch raises no alarm. A batch past it is looked for on the
scheduler. If a worker holds it, the batch is computed in this process at once
(the one place sure to answer), that worker is *suspect*, and new batches go
only to the other workers (Dask's worker restrictions) until the suspect
answers its late batch (its answer is dropped: the first answer won) or leaves
the cluster (its late batch is released, not recomputed elsewhere). With every
worker suspect, batches are computed here. A batch on no worker (queued behind
others) gets one more deadline, then is computed here. A scheduler that does
not answer the question within 2 s is taken for lost, as below. The cost: a
late batch is computed twice (here, and on its worker if that comes back), and
a worker merely slow (a long pause, a batch much heavier than the others) sits
out until it answers.

**The scheduler lost.** The scheduler forgets the tasks it held, and the
client's futures with them: every batch out, and every later one, is computed
in this process, so no message is lost, and none is answered twice (a batch's
result is taken from exactly one place). Meanwhile a background task tries
the same address again, waiting 0.5 s, then twice as long each time, up to
10 s; an attempt is a TCP connect first, so a scheduler still down costs
nothing. Once a scheduler answers there and has a worker, the model plugin is
registered on it again (a new scheduler knows no plugin) and the batches
submitted from then on go to the cluster. A local cluster (``--workers``) is
not restarted: it ran in this process, so losing it means something broke
here; the batches stay in this process.

**TLS.** ``tls://`` addresses, with the CA, certificate and key files Dask's
``Security`` takes (``tls_ca_file``, ``tls_cert``, ``tls_key``), else those
of Dask's own configuration (``distributed.comm.tls``); a reconnection uses
the same.

**Where it is.** :mod:`~digitstream.engine.dask.engine`: :class:`DaskEngine`,
its start and close, batches and models; :mod:`~digitstream.engine.dask.scheduler`:
the link to the scheduler (workers, loss, reconnection);
:mod:`~digitstream.engine.dask.worker`: what runs on a worker (the plugin, the
task); :mod:`~digitstream.engine.dask.packing`: payloads as buffers;
:mod:`~digitstream.engine.dask.slots`: the in-flight limit;
:mod:`~digitstream.engine.dask.logs`: the package's logger and its filter of
Dask's.
"""

from __future__ import annotations

from digitstream.engine.dask.engine import DaskEngine, scheduler_address
from digitstream.engine.dask.packing import pack, unpack
from digitstream.engine.dask.scheduler import SchedulerLink, SchedulerLost
from digitstream.engine.dask.worker import (
    FlowSpec,
    ModelPlugin,
    classify,
    dask_setup,
    model_loads,
    worker_label,
)

__all__ = [
    "DaskEngine",
    "FlowSpec",
    "ModelPlugin",
    "SchedulerLink",
    "SchedulerLost",
    "classify",
    "dask_setup",
    "model_loads",
    "pack",
    "scheduler_address",
    "unpack",
    "worker_label",
]
