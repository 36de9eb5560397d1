"""The ``digitstream`` command line.

Every subcommand is a thin shell over a function in the package: options are
parsed and checked here, the work is done elsewhere. Heavy imports happen
inside the commands so that ``--help`` stays instant.
"""

from __future__ import annotations

import gc
import logging
import os
import sys

import click

from digitstream.addresses import Address, parse_address
from digitstream.config import default
from digitstream.engine import ENGINES
from digitstream.errors import UserError
from digitstream.formats import INPUT_FORMATS, OUTPUT_FORMATS, RUN_INPUT_FORMATS
from digitstream.model.augment import AUGMENTATIONS


class AddressType(click.ParamType):
    """A ``HOST:PORT`` option value."""

    name = "HOST:PORT"

    def convert(self, value, param, ctx):
        if isinstance(value, Address):
            return value
        try:
            return parse_address(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


ADDRESS = AddressType()


class EndpointType(click.ParamType):
    """An ``--in`` / ``--out`` value: ``HOST:PORT``, or a URL whose scheme names the
    connector; its options are checked here, so a bad one is a usage error."""

    name = "HOST:PORT|URL"

    def __init__(self, role: str):
        self.role = role

    def convert(self, value, param, ctx):
        # start-up time: the connectors import NumPy, which --help does not need
        from digitstream.connectors import registry

        try:
            return registry.check(value, self.role)
        except (UserError, ValueError) as exc:
            self.fail(str(exc), param, ctx)


class BrokerOrAddressType(click.ParamType):
    """``HOST:PORT`` (an :class:`Address`), or the URL of a broker whose connector has a
    ``send`` (or ``listen``) tool (an :class:`~digitstream.connectors.kit.Endpoint`)."""

    name = "HOST:PORT|URL"

    def __init__(self, tool: str):
        self.tool = tool

    def convert(self, value, param, ctx):
        # start-up time: the connectors import NumPy, which --help does not need
        from digitstream.connectors import registry
        from digitstream.connectors.kit import Endpoint

        if isinstance(value, (Address, Endpoint)):
            return value
        try:
            _, endpoint = registry.broker(value, self.tool)
        except UserError as exc:
            self.fail(str(exc), param, ctx)
        if endpoint.scheme == "tcp":
            return ADDRESS.convert(endpoint.location, param, ctx)
        return endpoint


class OptionType(click.ParamType):
    """A connector's option as a ``run`` flag: checked by the connector's own parser."""

    def __init__(self, option):
        self.option = option
        self.name = option.metavar

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        try:
            return self.option.parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class WithConnectorFlags(click.Command):
    """A command that also takes the connectors' ``run`` flags (``--group``,
    ``--max-connections``...), each once, as the registry declares them. They are added
    when the command is parsed or its help shown, not when the command line is built:
    the connectors import NumPy, which ``digitstream --help`` has no need of."""

    _added = False

    def get_params(self, ctx):
        if not self._added:
            from digitstream.connectors import registry  # start-up time (see above)

            for option in registry.run_flags().values():
                if option.default is False:
                    param = click.Option([f"--{option.name}"], is_flag=True, help=option.help)
                else:
                    param = click.Option(
                        [f"--{option.name}"],
                        default=option.default,
                        show_default=True,
                        type=OptionType(option),
                        help=option.help,
                    )
                self.params.append(param)
            self._added = True
        return super().get_params(ctx)


class _Group(click.Group):
    """Turns the library's :class:`UserError` into Click's one-line error and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            raise click.ClickException(str(exc)) from None


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose < 0 else logging.DEBUG if verbose > 0 else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


@click.group(
    cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(package_name="digitstream")
@click.option("-v", "--verbose", count=True, help="More log output (repeat for more).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors in the log.")
def main(verbose: int, quiet: bool) -> None:
    """Classify live streams of hand-written digits (or anything a scikit-learn
    classifier takes) over TCP.

    \b
    The seed's flow, each in its own terminal:
      digitstream train                 # writes models/
      digitstream listen -o digits.out  # what `nc -l 127.0.0.1 7002` was
      digitstream run                   # the streaming application
      digitstream send                  # sends the digits data set once
      digitstream read digits.out       # one result per line
    or all of it at once: digitstream demo
    """
    _setup_logging(-1 if quiet else verbose)


# --------------------------------------------------------------------- train
@main.command()
@click.option(
    "--dataset",
    default="digits",
    show_default=True,
    help="digits (scikit-learn's bundled set), idx:DIR (MNIST-format IDX files, "
    "gzipped or not) or npz:FILE (arrays X and y).",
)
@click.option(
    "--model",
    "model_name",
    default="pca-logistic",
    show_default=True,
    help="Which model to train: best is the most accurate, and the slowest to serve; "
    "`digitstream train --list-models` names them all.",
)
@click.option(
    "--output",
    default="models",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Directory the model bundle is written to.",
)
@click.option(
    "--test-size",
    default=0.25,
    show_default=True,
    type=click.FloatRange(0.05, 0.9),
    help="Fraction of the data held out for the reported accuracy.",
)
@click.option(
    "--seed", default=0, show_default=True, type=int, help="Random seed of the split and search."
)
@click.option(
    "--jobs", default=1, show_default=True, type=int, help="Parallel jobs for the grid search."
)
@click.option(
    "--augment",
    type=click.Choice(list(AUGMENTATIONS)),
    default=None,
    help="Train on more images made from the training images: shift adds each one's four "
    "copies moved by one pixel (square images only). Only what is fitted on is augmented: "
    "the training part after the held-out split, and in the search each fold's fitting "
    "side, never its validation side.  [default: the model's own: shift for best, none for "
    "the others (pca-logistic measures worse with it)]",
)
@click.option("--list-models", is_flag=True, help="List the models that can be trained and exit.")
def train(dataset, model_name, output, test_size, seed, jobs, augment, list_models):
    """Train a model, evaluate it on held-out data and write a model bundle."""
    # start-up time: each command imports only what it runs (--help stays instant)
    from digitstream.model import train as training

    if list_models:
        for name, description in training.describe_models():
            click.echo(f"{name:16s} {description}")
        return
    training.main(
        dataset=dataset,
        model_name=model_name,
        output=output,
        test_size=test_size,
        seed=seed,
        jobs=jobs,
        augment=augment,
    )


# ----------------------------------------------------------------------- run
@main.command(cls=WithConnectorFlags)
@click.option(
    "--in",
    "in_addr",
    default=default("in_addr"),
    show_default=True,
    type=EndpointType("source"),
    help="Where input comes from: HOST:PORT (or tcp://HOST:PORT), the address the TCP "
    "source listens on for input frames; or redis://[:PASSWORD@]HOST:PORT/STREAM (rediss:// "
    "for TLS), read as consumer --name of consumer group --group.",
)
@click.option(
    "--out",
    "out_addr",
    default=default("out_addr"),
    show_default=True,
    type=EndpointType("sink"),
    help="Where results go: HOST:PORT (or tcp://HOST:PORT), the listener the TCP sink connects "
    "to; or redis://[:PASSWORD@]HOST:PORT/STREAM, one result entry per input.",
)
@click.option(
    "--metrics",
    "metrics_addr",
    default=str(default("metrics_addr")),
    show_default=True,
    type=ADDRESS,
    help="Address of the metrics UI (dashboard, /metrics, /api/stats).",
)
@click.option("--no-metrics", is_flag=True, help="Do not record metrics or serve the metrics UI.")
@click.option(
    "--model",
    "model_path",
    default=default("model_path"),
    show_default=True,
    help="Model bundle directory, or a single .skops file.",
)
@click.option(
    "--input-format",
    default=default("input_format"),
    show_default=True,
    type=click.Choice(RUN_INPUT_FORMATS),
    help="Payload format of input frames; auto accepts the seed's sender byte for byte "
    "(pickled arrays), .npy and JSON payloads.",
)
@click.option(
    "--output-format",
    default=default("output_format"),
    show_default=True,
    type=click.Choice(OUTPUT_FORMATS),
    help="text: the seed's `[3]`; json: one object per frame with seq, label, probability.",
)
@click.option(
    "--engine",
    default=default("engine"),
    show_default=True,
    type=click.Choice(list(ENGINES)),
    help="Where batches are classified: in this process, or on a Dask cluster.",
)
@click.option(
    "--workers",
    default=None,
    type=click.IntRange(1, 256),
    help="With --engine local: classify in N worker processes on this machine (for json, "
    "whose decoding keeps a core busy). With --engine dask and no --scheduler: start a "
    "local cluster of N workers.",
)
@click.option(
    "--scheduler",
    default=None,
    help="With --engine dask: address of a running scheduler, e.g. tcp://sched-host:8786 "
    "(tls://sched-host:8786 with the --tls-* files).",
)
@click.option(
    "--tls-ca-file",
    type=click.Path(dir_okay=False),
    help="With --scheduler: CA certificate (PEM) the scheduler's certificate is checked against.",
)
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False),
    help="With --scheduler: this client's certificate (PEM), signed by that CA.",
)
@click.option(
    "--tls-key",
    type=click.Path(dir_okay=False),
    help="With --scheduler: this client's private key (PEM).",
)
@click.option(
    "--batch-deadline",
    default=default("batch_deadline"),
    show_default=True,
    type=click.FloatRange(0, 3600),
    help="With --engine dask: seconds a batch may take on the cluster (at least 4 recent "
    "round trips) before it is computed here and its worker gets no more until it "
    "answers (0: wait for Dask). With --engine local --workers: seconds a worker process "
    "may take on a batch (at least 4 recent batches' time) before it is killed and its "
    "batches go elsewhere (0: no limit).",
)
@click.option(
    "--name",
    default=default("name"),
    show_default=True,
    help="Name of this application process in metrics and logs, and its consumer name in a "
    "Redis consumer group (unique per process of the group).",
)
@click.option(
    "--max-batch",
    default=default("max_batch"),
    show_default=True,
    type=click.IntRange(1, 1 << 22),
    help="Most messages classified in one batch.",
)
@click.option(
    "--max-delay-ms",
    default=default("max_delay") * 1000.0,
    show_default=True,
    type=click.FloatRange(0, 10_000),
    help="Wait up to this long for a batch to fill (0: never wait).",
)
@click.option(
    "--max-frame",
    default=default("max_frame"),
    show_default=True,
    type=click.IntRange(1, 1 << 30),
    help="Largest accepted frame payload in bytes; a larger header closes that connection.",
)
@click.option(
    "--compile/--no-compile",
    "compile_model",
    default=default("compile_model"),
    show_default=True,
    help="Fuse an all-linear pipeline into one affine map.",
)
@click.option(
    "--in-flight",
    default=default("in_flight"),
    show_default=True,
    type=click.IntRange(1, 1024),
    help="With --engine dask: batches in flight per worker.",
)
@click.option(
    "--flush-timeout",
    default=default("flush_timeout"),
    show_default=True,
    type=click.FloatRange(0, 86_400),
    help="On SIGINT or SIGTERM, seconds to wait for the listener to take the last results "
    "(after up to 5 s of reading what senders still send).",
)
@click.option(
    "--acked",
    is_flag=True,
    help="Acknowledged, exactly-once delivery: input from `send --acked`, results to "
    "`listen --acked` (see the README).",
)
@click.option(
    "--drift/--no-drift",
    default=default("drift"),
    show_default=True,
    help="Judge drift against the model's reference profile, and estimate its accuracy "
    "without labels (when its bundle has a profile).",
)
@click.option(
    "--drift-window",
    default=default("drift_window"),
    show_default=True,
    type=click.IntRange(100, 1 << 30),
    help="The drift window: at least the latest N messages and 1,024 sampled rows (in 16 "
    "chunks) ...",
)
@click.option(
    "--drift-seconds",
    default=default("drift_seconds"),
    show_default=True,
    type=click.FloatRange(1, 86_400),
    help="... none older than this many seconds.",
)
@click.option(
    "--labels",
    default=None,
    type=EndpointType("source"),
    help='Labels that arrive later, records {"id": ..., "label": ...} joined by id to the '
    "predictions of inputs that carried that id: HOST:PORT (run listens there for framed "
    "JSON records) or a broker's URL, as --in.",
)
@click.option(
    "--label-window",
    default=default("label_window"),
    show_default=True,
    type=click.IntRange(1, 1 << 30),
    help="With --labels: most predictions awaiting a label; the oldest go first.",
)
@click.option(
    "--shadow",
    default=None,
    help="A second model bundle (or .skops file) scored on the same batches, off the served "
    "path: agreement, disagreement and both accuracies in the metrics. A new bundle written "
    "there is swapped in; `digitstream promote` serves it.",
)
def run(
    in_addr,
    out_addr,
    metrics_addr,
    no_metrics,
    model_path,
    input_format,
    output_format,
    engine,
    workers,
    scheduler,
    tls_ca_file,
    tls_cert,
    tls_key,
    batch_deadline,
    name,
    max_batch,
    max_delay_ms,
    max_frame,
    compile_model,
    in_flight,
    flush_timeout,
    acked,
    drift,
    drift_window,
    drift_seconds,
    labels,
    label_window,
    shadow,
    **connector_flag_values,
):
    """The streaming application: read --in, classify, write results to --out.

    Exactly one result frame is written per input frame, in input order per
    connection. SIGINT or SIGTERM stops accepting, answers everything already
    received, flushes and exits 0 (1, with the count in the log, if the
    listener did not take the last results within --flush-timeout).
    """
    if engine == "local" and scheduler:
        raise click.UsageError("--scheduler needs --engine dask")
    if workers and scheduler:
        raise click.UsageError(
            "--workers starts a local cluster, --scheduler uses a running one: give one of them"
        )
    if (tls_ca_file or tls_cert or tls_key) and not scheduler:
        raise click.UsageError("--tls-ca-file, --tls-cert and --tls-key go with --scheduler")
    if engine == "local":
        # The local engine runs BLAS on one thread (engine/local.py). Saying so before
        # NumPy and SciPy load their OpenBLAS spares starting two thread pools whose
        # threads spin for a while once started, taking a core from the start-up.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # start-up time: each command imports only what it runs (--help stays instant)
    from digitstream.memory import keep_batch_memory

    keep_batch_memory()
    _import_start_path(metrics=not no_metrics)
    # start-up time: each command imports only what it runs (--help stays instant)
    from digitstream.app import AppConfig, run_app
    from digitstream.connectors.registry import flag_values

    config = AppConfig(
        in_addr=in_addr,
        out_addr=out_addr,
        metrics_addr=None if no_metrics else metrics_addr,
        model_path=model_path,
        input_format=input_format,
        output_format=output_format,
        engine=engine,
        workers=workers,
        scheduler=scheduler,
        tls_ca_file=tls_ca_file,
        tls_cert=tls_cert,
        tls_key=tls_key,
        batch_deadline=batch_deadline,
        name=name,
        connector_options=flag_values(connector_flag_values),
        max_batch=max_batch,
        max_delay=max_delay_ms / 1000.0,
        max_frame=max_frame,
        compile_model=compile_model,
        in_flight=in_flight,
        flush_timeout=flush_timeout,
        acked=acked,
        drift=drift,
        drift_window=drift_window,
        drift_seconds=drift_seconds,
        labels=labels,
        label_window=label_window,
        shadow=shadow,
    )
    sys.exit(run_app(config))


def _import_start_path(metrics: bool) -> None:
    """Import the modules ``run`` needs before it listens, with the cyclic garbage
    collector paused.

    They are most of its start-up time (aiohttp for the metrics UI, NumPy; and
    scikit-learn and SciPy through skops when the model is not served from its stored
    arrays, which ``digitstream.app`` then loads). Importing them makes a great many
    objects that live as long as the process and next to no garbage, so the collections
    that would run meanwhile find nothing to free. ``run`` imports them again where it
    uses them; this only does it sooner.
    """
    # start-up time: each command imports only what it runs (--help stays instant)
    import importlib

    modules = ["digitstream.app", "digitstream.model.bundle"]
    if metrics:
        modules += ["digitstream.metrics.recorder", "digitstream.metrics.server"]
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for module in modules:
            importlib.import_module(module)
    except Exception:
        pass  # imported again where it is used, it fails there as it always did
    finally:
        if was_enabled:
            gc.enable()


# ---------------------------------------------------------------------- send
@main.command()
@click.option(
    "--to",
    "to_addr",
    default="127.0.0.1:8002",
    show_default=True,
    type=BrokerOrAddressType("send"),
    help="Address of the application's input, or a broker's URL (redis://[:PASSWORD@]"
    "HOST:PORT/STREAM, ...): one message per image, with its label and id.",
)
@click.option(
    "--format",
    "fmt",
    default="pickle",
    show_default=True,
    type=click.Choice(INPUT_FORMATS),
    help="Payload format; pickle is what the seed's sender sends.",
)
@click.option(
    "--dataset",
    default="digits",
    show_default=True,
    help="digits, idx:DIR or npz:FILE (as for train).",
)
@click.option(
    "--repeat",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Send the data set this many times.",
)
@click.option(
    "--rate",
    default=None,
    type=click.FloatRange(min=1.0),
    help="Pace sending at this many messages per second (per run, over all connections).",
)
@click.option(
    "--connections",
    default=1,
    show_default=True,
    type=click.IntRange(1, 4096),
    help="Split the messages over this many connections.",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Show a progress bar (default: when stderr is a terminal).",
)
@click.option(
    "--acked",
    is_flag=True,
    help="Acknowledged delivery to `run --acked`: resumes where the stream stands, "
    "ends once every message is stored.",
)
@click.option("--stream", default=None, help="With --acked: the stream's name (required).")
@click.option(
    "--window",
    default=1 << 17,
    show_default=True,
    type=click.IntRange(1),
    help="With --acked: most messages sent and not yet acknowledged.",
)
def send(to_addr, fmt, dataset, repeat, rate, connections, progress, acked, stream, window):
    """Send a data set to the application, one framed image per message."""
    if not isinstance(to_addr, Address):
        # start-up time: the connectors import NumPy, which --help does not need
        from digitstream.connectors.registry import BY_SCHEME
        from digitstream.tools import broker

        if acked or stream or connections != 1:
            raise click.UsageError(
                f"--acked, --stream and --connections are for TCP, not {to_addr.scheme}://"
            )
        sys.exit(broker.send_main(BY_SCHEME[to_addr.scheme], to_addr, fmt, dataset, repeat, rate))
    if acked:
        # start-up time: each command imports only what it runs (--help stays instant)
        from digitstream.tools import acked_sender

        if not stream or connections != 1:
            raise click.UsageError("--acked needs --stream NAME, and one connection")
        sys.exit(acked_sender.main(to_addr, stream, fmt, dataset, repeat, rate, window))
    if stream:
        raise click.UsageError("--stream needs --acked")
    # start-up time: each command imports only what it runs (--help stays instant)
    from digitstream.tools import sender

    sys.exit(
        sender.main(
            to_addr=to_addr,
            fmt=fmt,
            dataset=dataset,
            repeat=repeat,
            rate=rate,
            connections=connections,
            progress=progress,
        )
    )


# -------------------------------------------------------------------- listen
@main.command()
@click.argument(
    "addr", default="127.0.0.1:7002", type=BrokerOrAddressType("listen"), required=False
)
@click.option(
    "-o",
    "--output",
    default=None,
    type=click.Path(dir_okay=False),
    help="Store the raw result frames in this file (readable by `digitstream read`). "
    "Without it, results are printed one per line.",
)
@click.option(
    "--count", default=None, type=click.IntRange(1), help="Stop after this many result frames."
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Show a live count (default: when stderr is a terminal and -o is given).",
)
@click.option(
    "--acked",
    is_flag=True,
    help="From `run --acked`: store each result exactly once in -o FILE, continued across "
    "restarts, and acknowledge it once stored.",
)
@click.option("--fsync", is_flag=True, help="With --acked: fsync FILE before acknowledging.")
def listen(addr, output, count, progress, acked, fsync):
    """Accept the application's connection and store or print its results
    (what `nc -l 127.0.0.1 7002 > digits.out` was); or read a broker's result stream ADDR
    (redis://[:PASSWORD@]HOST:PORT/STREAM, ...) from its start, in its order."""
    if not isinstance(addr, Address):
        # start-up time: the connectors import NumPy, which --help does not need
        from digitstream.connectors.registry import BY_SCHEME
        from digitstream.tools import broker

        if acked or fsync:
            raise click.UsageError(f"--acked and --fsync are for TCP, not {addr.scheme}://")
        sys.exit(broker.listen_main(BY_SCHEME[addr.scheme], addr, output, count))
    if acked:
        # start-up time: each command imports only what it runs (--help stays instant)
        from digitstream.tools import acked_listener

        if not output or count:
            raise click.UsageError("--acked needs -o FILE, and takes no --count")
        sys.exit(acked_listener.main(addr, output, fsync=fsync))
    if fsync:
        raise click.UsageError("--fsync needs --acked")
    # start-up time: each command imports only what it runs (--help stays instant)
    from digitstream.tools import listener

    sys.exit(listener.main(addr=addr, output=output, count=count, progress=progress))


# ---------------------------------------------------------------------- read
@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--stream", default=None, help="Of a file of `listen --acked`: only this stream's results."
)
def read(file, stream):
    """Print each result frame of FILE, one per line (files from `listen -o` or `nc -l`,
    and from `listen --acked -o`: each result once, in order per stream)."""
    # start-up time: each command imports only what it runs (--help stays instant)
    from digitstream.tools import reader

    sys.exit(reader.main(file, stream=stream))


# ---------------------------------------------------------------------- demo
@main.command()
@click.option(
    "--model",
    "model_path",
    default="models",
    show_default=True,
    help="Model bundle directory; trained first if missing.",
)
@click.option(
    "--output",
    default="digits.out",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Where the listener stores the results.",
)
@click.option(
    "--repeat",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Send the data set this many times.",
)
@click.option(
    "--keep-running",
    is_flag=True,
    help="Keep the application and its dashboard up after the summary, until Ctrl-C.",
)
@click.option(
    "--redis",
    "through_redis",
    is_flag=True,
    help="Through Redis Streams instead: a local redis-server, three consumers in one group, "
    "one killed half-way; ends with duplicates and missing (both 0).",
)
@click.option(
    "--kafka",
    "kafka_url",
    default=None,
    metavar="URL",
    help="Through the Kafka broker at URL (kafka://HOST:PORT/TOPIC, ?partitions=N for a new "
    "topic) instead: two runs of one group writing TOPIC-results, one killed half-way; ends "
    "with duplicates and missing (both 0).",
)
def demo(model_path, output, repeat, keep_running, through_redis, kafka_url):
    """The seed's whole flow on this machine: train (if needed), run, listen,
    send, then a summary."""
    if kafka_url:
        # start-up time: each command imports only what it runs (--help stays instant)
        from digitstream.tools import broker_demo

        if keep_running or through_redis:
            raise click.UsageError("--kafka goes without --redis and --keep-running")
        if not kafka_url.lower().startswith(("kafka://", "kafkas://")):
            raise click.UsageError("--kafka takes a kafka:// or kafkas:// URL")
        sys.exit(broker_demo.main(kafka_url, model_path=model_path, repeat=repeat))
    if through_redis:
        # start-up time: each command imports only what it runs (--help stays instant)
        from digitstream.tools import redis_demo

        if keep_running:
            raise click.UsageError("--keep-running is for the TCP demo")
        sys.exit(redis_demo.main(model_path=model_path, output=output, repeat=repeat))
    # start-up time: each command imports only what it runs (--help stays instant)
    from digitstream.tools import demo as demo_mod

    sys.exit(
        demo_mod.main(
            model_path=model_path, output=output, repeat=repeat, keep_running=keep_running
        )
    )


# --------------------------------------------------------------------- bench
@main.command()
@click.option("--quick", is_flag=True, help="A short run (well under a minute).")
@click.option(
    "--json",
    "json_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write every figure to this JSON file.",
)
@click.option(
    "--plot",
    "plot_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write a PNG chart (throughput bars, latency distribution).",
)
@click.option(
    "--engine",
    default="local",
    show_default=True,
    type=click.Choice(list(ENGINES)),
    help="dask: compare the Dask engine with the local one.",
)
@click.option(
    "--soak",
    "soak_minutes",
    default=None,
    type=click.FloatRange(min=0.1),
    help="Instead: sustained load for this many minutes, throughput and memory over time.",
)
@click.option(
    "--runs",
    default=None,
    type=click.IntRange(1, 50),
    help="Throughput runs per system (median reported).",
)
@click.option(
    "--redis",
    "through_redis",
    is_flag=True,
    help="Instead: the Redis Streams connector (one and three consumers) against a bare relay "
    "through the same local redis-server.",
)
@click.option(
    "--nats",
    "through_nats",
    is_flag=True,
    help="Instead: the NATS JetStream connector against a bare nats-py relay through the "
    "same local nats-server.",
)
@click.option(
    "--kafka",
    "through_kafka",
    is_flag=True,
    help="Instead: the Kafka connector, with and without exactly-once, against a bare "
    "confluent-kafka relay with and without transactions, on the same broker.",
)
@click.option(
    "--kafka-bootstrap",
    default=None,
    metavar="HOST:PORT",
    help="With --kafka: the broker to use (default: one started from the jars of "
    "`make kafka-jars`).",
)
@click.option(
    "--scheduler",
    default=None,
    help="With --engine dask: instead, only the Dask questions, against the running cluster "
    "at this address (tcp://HOST:PORT), with whatever workers it has (their number is "
    "reported): the cluster beside the local engine, in place of one and two local workers.",
)
def bench(
    quick,
    json_path,
    plot_path,
    engine,
    soak_minutes,
    runs,
    through_redis,
    through_nats,
    through_kafka,
    kafka_bootstrap,
    scheduler,
):
    """Benchmark digitstream against the seed's per-message design and a bare relay."""
    if scheduler:
        if engine != "dask":
            raise click.UsageError("--scheduler needs --engine dask")
        # start-up time: each command imports only what it runs (--help stays instant)
        from digitstream.bench import dask_bench

        sys.exit(dask_bench.main(scheduler, quick=quick, json_path=json_path, runs=runs))
    if through_redis:
        # start-up time: each command imports only what it runs (--help stays instant)
        from digitstream.bench import redis_bench

        sys.exit(redis_bench.main(quick=quick, json_path=json_path, runs=runs))
    if through_nats:
        # start-up time: each command imports only what it runs (--help stays instant)
        from digitstream.bench import nats_bench

        sys.exit(nats_bench.main(quick=quick, json_path=json_path, runs=runs))
    if through_kafka or kafka_bootstrap:
        # start-up time: each command imports only what it runs (--help stays instant)
        from digitstream.bench import kafka_bench

        sys.exit(
            kafka_bench.main(quick=quick, json_path=json_path, runs=runs, bootstrap=kafka_bootstrap)
        )
    # start-up time: each command imports only what it runs (--help stays instant)
    from digitstream.bench import runner

    sys.exit(
        runner.main(
            quick=quick,
            json_path=json_path,
            plot_path=plot_path,
            engine=engine,
            soak_minutes=soak_minutes,
            runs=runs,
        )
    )


# ------------------------------------------------------------------- profile
@main.command()
@click.option(
    "--model",
    "model_path",
    required=True,
    help="A model bundle directory, or a single .skops file (the profile goes beside it, "
    "as NAME.profile.json).",
)
@click.option(
    "--dataset",
    required=True,
    help="What the model was trained on: digits, idx:DIR or npz:FILE (as for train).",
)
@click.option(
    "--test-size",
    default=0.25,
    show_default=True,
    type=click.FloatRange(0.05, 0.9),
    help="Fraction held out (stratified): the reference is the rest.",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the split.")
def profile(model_path, dataset, test_size, seed):
    """Add a reference profile to a model bundle or .skops file: what `run` judges drift
    and estimates accuracy against. `train` stores one in every bundle it writes."""
    # start-up time: each command imports only what it runs (--help stays instant)
    from digitstream.tools import profiler

    profiler.main(model_path, dataset, test_size=test_size, seed=seed)


# ------------------------------------------------------------------- promote
@main.command()
@click.option(
    "--model",
    "model_dir",
    required=True,
    help="The bundle directory a run serves (its --model).",
)
@click.option(
    "--shadow",
    "shadow_path",
    required=True,
    help="The shadow model's bundle directory or .skops file (the run's --shadow).",
)
def promote(model_dir, shadow_path):
    """Make the shadow model the served one, and the served one the shadow.

    The bundles' files are exchanged (each renamed into place, the card last); a run
    serving them swaps both in without losing a message."""
    # start-up time: each command imports only what it runs (--help stays instant)
    from digitstream.tools import promote as promoting

    promoting.main(model_dir, shadow_path)


# ------------------------------------------------------------------- inspect
@main.command()
@click.argument("path")
def inspect(path):
    """Print a model bundle's card and check it (hash, types, feature count)."""
    # start-up time: each command imports only what it runs (--help stays instant)
    from digitstream.model import bundle

    sys.exit(bundle.inspect_main(path))


if __name__ == "__main__":  # pragma: no cover
    main()
