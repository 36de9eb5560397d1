"""``digitstream bench``: the benchmark of the design's "Benchmark protocol".

* :mod:`~digitstream.bench.runner`: the suite and its figures;
* :mod:`~digitstream.bench.settings`: the settings, and what every figures document records;
* :mod:`~digitstream.bench.systems`: the systems under test, as processes;
* :mod:`~digitstream.bench.worker`: the sender and listener processes;
* :mod:`~digitstream.bench.baseline`: the seed's per-message design;
* :mod:`~digitstream.bench.relay`: frames forwarded untouched (the ceiling);
* :mod:`~digitstream.bench.report`: tables, JSON and the chart;
* :mod:`~digitstream.bench.soak`: sustained load over minutes.

Throughput, latency and percentiles come from :mod:`digitstream.tools.measure`, which
``digitstream demo`` shares: the benchmark may use the tools, never the other way round.
"""
