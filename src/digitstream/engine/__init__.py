"""Engines: where batches are classified. The interface is :mod:`digitstream.engine.base`."""

#: engine name -> "module:class", imported only when chosen; adding an engine is a line here
ENGINES = {
    "local": "digitstream.engine.local:LocalEngine",
    "dask": "digitstream.engine.dask:DaskEngine",
}
