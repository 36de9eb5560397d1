"""What a flow measures of each batch for the model monitor: a small sample of it, binned.

A :class:`Sketcher` runs where the decoded pixels exist (in :class:`~digitstream.pipeline.Flow`,
so in this process, a worker process or a Dask worker alike) and turns a batch into a few
small arrays that travel on its :class:`~digitstream.batch.BatchResult`: how many of the
sampled rows fell in each bin of each feature, and in each bin of the winning probability.
Those are sufficient statistics: a window's histograms are the sums of its batches', so the
application adds arrays and never sees a pixel.

The sample is about one message in ``stride``, at most ``max_rows`` of a batch, drawn at
random: every ``stride``-th message would show a stream that repeats a data set whose
length shares a factor with the stride (or senders that each send the same images) the same
few images again and again. Binning is one vectorised pass and one ``np.bincount`` over
``feature * bins + bin``; there is no per-message Python. What a sketch costs is bounded by
the flow (:data:`digitstream.pipeline.SKETCH_SHARE`).
"""

from __future__ import annotations

import numpy as np

#: about one message in STRIDE is sampled ...
STRIDE = 8
#: ... and at most this many rows of one batch
MAX_ROWS = 128


class Sketcher:
    """Bins sampled rows of a batch: ``bins`` equal bins over ``[low, high]`` per feature
    (values outside go to the end bins), and the winning probability over
    ``confidence_edges`` (None: the model gives no probabilities, or they are not wanted)."""

    __slots__ = (
        "_offsets",
        "_scale",
        "bins",
        "confidence_edges",
        "high",
        "low",
        "max_rows",
        "n_features",
        "stride",
    )

    def __init__(
        self,
        n_features: int,
        low: float,
        high: float,
        bins: int,
        confidence_edges: np.ndarray | None = None,
        stride: int = STRIDE,
        max_rows: int = MAX_ROWS,
    ):
        self.n_features = n_features
        self.low = float(low)
        self.high = float(high)
        self.bins = bins
        self.confidence_edges = (
            None if confidence_edges is None else np.asarray(confidence_edges, dtype=np.float64)
        )
        self.stride = stride
        self.max_rows = max_rows
        self._scale = bins / (self.high - self.low) if self.high > self.low else 0.0
        self._offsets = (np.arange(n_features, dtype=np.int32) * bins)[None, :]

    def __getstate__(self):
        return (
            self.n_features,
            self.low,
            self.high,
            self.bins,
            self.confidence_edges,
            self.stride,
            self.max_rows,
        )

    def __setstate__(self, state) -> None:
        self.__init__(*state)  # type: ignore[misc]

    @property
    def size(self) -> int:
        """Length of a batch's feature counts: ``n_features * bins``."""
        return self.n_features * self.bins

    def rows(self, n: int, errors: dict[int, str] | None = None, rng=None) -> np.ndarray:
        """Indices of the rows to sample of a batch of ``n`` frames: each with a chance of one
        in ``stride`` (a batch that would give more than ``max_rows``: ``max_rows`` drawn
        with replacement), rejected rows left out. ``rng``: a NumPy Generator."""
        rng = rng if rng is not None else np.random.default_rng()
        if n <= self.stride * self.max_rows:
            rows = np.flatnonzero(rng.random(n) < 1.0 / self.stride)
        else:
            rows = rng.integers(0, n, self.max_rows)
        if errors:
            rows = rows[~np.isin(rows, np.fromiter(errors, dtype=np.intp, count=len(errors)))]
        return rows

    def bin_index(self, X: np.ndarray) -> np.ndarray:
        """(n, n_features) flat bin numbers, ``feature * bins + bin``."""
        scaled = X - np.asarray(self.low, dtype=X.dtype)
        scaled *= np.asarray(self._scale, dtype=X.dtype)
        index = scaled.astype(np.int32)
        np.maximum(index, 0, out=index)
        np.minimum(index, self.bins - 1, out=index)
        index += self._offsets
        return index

    def feature_counts(self, X: np.ndarray) -> np.ndarray:
        """(n_features * bins,) int32: how many rows of ``X`` fall in each bin of each feature."""
        counts = np.bincount(self.bin_index(X).ravel(), minlength=self.size)
        return counts.astype(np.int32, copy=False)

    def confidence_counts(self, confidence: np.ndarray) -> np.ndarray:
        """(len(confidence_edges) - 1,) int32: the winning probabilities, binned."""
        edges = self.confidence_edges
        assert edges is not None, "a sketcher without confidence bins"
        index = np.searchsorted(edges, confidence, side="right") - 1
        np.clip(index, 0, len(edges) - 2, out=index)
        return np.bincount(index, minlength=len(edges) - 1).astype(np.int32, copy=False)

    def __repr__(self) -> str:
        return (
            f"Sketcher({self.n_features} features x {self.bins} bins over "
            f"[{self.low:g}, {self.high:g}], every {self.stride}th row, "
            f"at most {self.max_rows} a batch)"
        )
