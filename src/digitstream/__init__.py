"""digitstream: classify live streams of images with scikit-learn, batch by batch."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("digitstream")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"
