"""Connectors: one module per outside system, each a source, a sink or both.

A connector module holds its source and sink classes (built on the kit:
:mod:`digitstream.sources`, :mod:`digitstream.sinks`,
:mod:`digitstream.connectors.kit`), declares its options, and ends with its
:class:`~digitstream.connectors.kit.Connector`; :mod:`digitstream.connectors.registry`
lists it by its URL schemes.
"""
