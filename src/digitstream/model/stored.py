"""A linear pipeline read from its skops file without importing scikit-learn.

Importing scikit-learn takes one to two seconds, most of it in SciPy modules
that a linear model never uses. A pipeline that is served fused (affine steps
and a linear classifier, see :mod:`digitstream.model.runner`) needs only a few
arrays of its steps to be served, and skops keeps every array as a ``.npy``
member of its zip archive, next to ``schema.json``, a tree of nodes that names
each object's type, the skops loader that rebuilds it, and its content.

:func:`read_stored` reads that tree and returns a :class:`StoredPipeline` when
every node is of a type on a short list: builtins containers and JSON values,
NumPy arrays stored as ``.npy`` (read with ``allow_pickle=False``), and the
scikit-learn types the fused path composes, all of them types skops trusts by
default. Anything else, including a schema protocol other than the one read
here, gives None, and the bundle is then loaded by skops alone.

A :class:`StoredPipeline` stands in for the scikit-learn pipeline until that is
loaded: its steps carry the fitted attributes as stored; ``predict`` and
``predict_proba`` (which the fused runner calls only for rows within its tie
margin) wait for the real pipeline, handed over with :meth:`~StoredPipeline.resolve`.
"""

from __future__ import annotations

import io
import json
import threading
import zipfile
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from digitstream.model.trusted import load_trusted

#: the schema protocol of skops files read here
PROTOCOL = 2
SCHEMA_FILE = "schema.json"

#: (module, class) of the estimators read here, and the kind each is known by
ESTIMATOR_KINDS: dict[tuple[str, str], str] = {
    ("sklearn.preprocessing._data", "StandardScaler"): "StandardScaler",
    ("sklearn.decomposition._pca", "PCA"): "PCA",
    ("sklearn.linear_model._logistic", "LogisticRegression"): "LogisticRegression",
    ("sklearn.svm._classes", "LinearSVC"): "LinearSVC",
}
PIPELINE = ("sklearn.pipeline", "Pipeline")
TRANSFORMER_KINDS = frozenset({"StandardScaler", "PCA"})
CLASSIFIER_KINDS = frozenset({"LogisticRegression", "LinearSVC"})
#: classifiers with ``predict_proba``
PROBABILISTIC_KINDS = frozenset({"LogisticRegression"})

_JSON_TYPES = frozenset({"str", "int", "float", "bool", "NoneType"})

_ARRAY = (np.ndarray,)
_ARRAY_OR_NONE = (np.ndarray, type(None))
#: the fitted attributes the fused map is composed from, and what each must be
REQUIRED: dict[str, dict[str, tuple[type, ...]]] = {
    "StandardScaler": {"with_mean": (bool,), "mean_": _ARRAY_OR_NONE, "scale_": _ARRAY_OR_NONE},
    "PCA": {
        "components_": _ARRAY,
        "mean_": _ARRAY,
        "whiten": (bool,),
        "explained_variance_": _ARRAY,
    },
    "LogisticRegression": {"coef_": _ARRAY, "intercept_": _ARRAY, "classes_": _ARRAY},
    "LinearSVC": {"coef_": _ARRAY, "intercept_": _ARRAY, "classes_": _ARRAY},
}


_MISSING = object()


class Unreadable(Exception):
    """The file holds something this reader does not read (skops may)."""


class StoredStep:
    """A fitted estimator's attributes as stored; ``kind`` names its class."""

    # of every step read (checked by the reader); classes_ of the classifier
    n_features_in_: int
    classes_: np.ndarray

    def __init__(self, kind: str, attributes: dict[str, Any]):
        self.kind = kind
        self.__dict__.update(attributes)

    def __repr__(self) -> str:
        return f"<stored {self.kind}>"


class StoredPipeline:
    """The stored steps of a fusable pipeline, and the real pipeline once loaded."""

    def __init__(self, steps: list[tuple[str, Any]], data: bytes):
        #: (name, step) as the Pipeline holds them: a StoredStep, "passthrough" or None
        self.steps = steps
        #: the skops file, for loading the real pipeline
        self.data = data
        real = [step for _, step in steps if isinstance(step, StoredStep)]
        final = real[-1]
        self.classes_ = final.classes_
        self.n_features_in_ = real[0].n_features_in_
        if final.kind in PROBABILISTIC_KINDS:
            self.predict_proba = self._predict_proba
        self._loaded: Future = Future()

    # ------------------------------------------------ the real pipeline
    def resolve(self, pipeline) -> None:
        """Hand over the real pipeline: calls waiting for it go on."""
        self._loaded.set_result(pipeline)

    def fail(self, exc: BaseException) -> None:
        """The real pipeline could not be loaded: calls that need it raise ``exc``."""
        self._loaded.set_exception(exc)

    @property
    def resolved(self) -> bool:
        """Whether the real pipeline has been handed over (not if it failed to load)."""
        return self._loaded.done() and self._loaded.exception() is None

    def loaded(self, timeout: float | None = None):
        """The real pipeline, waiting for it if it is still being loaded."""
        return self._loaded.result(timeout)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.loaded().predict(X)

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.loaded().predict_proba(X)

    def __repr__(self) -> str:
        return f"<stored pipeline {' -> '.join(name for name, _ in self.steps)}>"

    def __reduce__(self):
        # Pickled for a worker process (digitstream.engine.pool): the real pipeline once it
        # is here, else the stored steps, which load it there on a thread of their own.
        if self.resolved:
            return (_same, (self.loaded(),))
        return (_loading_elsewhere, (self.steps, self.data))


def _same(pipeline):
    return pipeline


def _loading_elsewhere(steps: list, data: bytes) -> StoredPipeline:
    stored = StoredPipeline(steps, data)

    def load() -> None:
        try:
            stored.resolve(load_trusted(data, Path("the model's pipeline.skops")))
        except BaseException as exc:
            stored.fail(exc)

    threading.Thread(target=load, name="pipeline loader", daemon=True).start()
    return stored


def read_stored(data: bytes) -> StoredPipeline | None:
    """The fusable pipeline in the skops file ``data``, or None if the file holds
    anything not read here (it may still be a valid skops file)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            schema = json.loads(archive.read(SCHEMA_FILE))
            if not isinstance(schema, dict) or schema.get("protocol") != PROTOCOL:
                return None
            return _Reader(archive).pipeline(schema, data)
    except (Unreadable, zipfile.BadZipFile, KeyError, ValueError, TypeError, OSError):
        return None


class _Reader:
    def __init__(self, archive: zipfile.ZipFile):
        self.archive = archive

    def pipeline(self, schema: dict, data: bytes) -> StoredPipeline:
        kind = self._type(schema)
        if kind == PIPELINE:
            if schema.get("__loader__") != "ObjectNode":
                raise Unreadable("Pipeline")
            steps = self.value(self._attributes(schema)["steps"])
            if not isinstance(steps, list) or not steps:
                raise Unreadable("steps")
            return self._checked(steps, data)
        step = self.value(schema)
        if not isinstance(step, StoredStep):
            raise Unreadable("top")
        return self._checked([(step.kind, step)], data)

    def _checked(self, steps: list, data: bytes) -> StoredPipeline:
        pairs = []
        for pair in steps:
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
                raise Unreadable("step")
            name, step = pair
            if not (step is None or step == "passthrough" or isinstance(step, StoredStep)):
                raise Unreadable("step")
            pairs.append((name, step))
        real = [step for _, step in pairs if isinstance(step, StoredStep)]
        if not real or real[-1].kind not in CLASSIFIER_KINDS:
            raise Unreadable("classifier")
        if any(step.kind not in TRANSFORMER_KINDS for step in real[:-1]):
            raise Unreadable("transformer")
        if not isinstance(pairs[-1][1], StoredStep):
            raise Unreadable("final step")
        for step in real:
            wanted = {"n_features_in_": (int,), **REQUIRED[step.kind]}
            for attribute, types in wanted.items():
                value = step.__dict__.get(attribute, _MISSING)
                if type(value) is bool and bool not in types:
                    raise Unreadable(attribute)  # not an int, though Python says it is
                if not isinstance(value, types):
                    raise Unreadable(attribute)
        return StoredPipeline(pairs, data)

    # ------------------------------------------------------------ nodes
    @staticmethod
    def _type(node) -> tuple[str, str]:
        if not isinstance(node, dict):
            raise Unreadable("node")
        module, name = node.get("__module__"), node.get("__class__")
        if not (isinstance(module, str) and isinstance(name, str)):
            raise Unreadable("node type")
        return module, name

    def _attributes(self, node: dict) -> dict[str, Any]:
        content = node.get("content")
        if not isinstance(content, dict) or self._type(content) != ("builtins", "dict"):
            raise Unreadable("attributes")
        if content.get("__loader__") != "DictNode":
            raise Unreadable("attributes")
        return self._dict_items(content)

    def _dict_items(self, node: dict) -> dict[str, Any]:
        items = node.get("content")
        key_types = self.value(node.get("key_types"))
        if not isinstance(items, dict) or key_types != [str] * len(items):
            raise Unreadable("dict keys")
        return items

    def value(self, node) -> Any:
        module, name = self._type(node)
        loader = node.get("__loader__")
        if loader == "JsonNode":
            if module != "builtins" or name not in _JSON_TYPES or node.get("is_json") is not True:
                raise Unreadable("json")
            return json.loads(node["content"])
        if loader == "NdArrayNode":
            if module != "numpy" or node.get("type") != "numpy":
                raise Unreadable("array")
            with self.archive.open(node["file"]) as member:
                array = np.load(io.BytesIO(member.read()), allow_pickle=False)
            return array if name == "ndarray" else array[()]
        if loader == "TypeNode":
            if (module, name) != ("builtins", "str"):
                raise Unreadable("type")
            return str
        if loader in ("ListNode", "TupleNode"):
            if (module, name) != ("builtins", "list" if loader == "ListNode" else "tuple"):
                raise Unreadable("sequence")
            items = node.get("content")
            if not isinstance(items, list):
                raise Unreadable("sequence")
            values = [self.value(item) for item in items]
            return values if loader == "ListNode" else tuple(values)
        if loader == "DictNode":
            if (module, name) != ("builtins", "dict"):
                raise Unreadable("dict")
            return {key: self.value(item) for key, item in self._dict_items(node).items()}
        if loader == "ObjectNode" and (module, name) in ESTIMATOR_KINDS:
            attributes = {key: self.value(item) for key, item in self._attributes(node).items()}
            return StoredStep(ESTIMATOR_KINDS[module, name], attributes)
        raise Unreadable(f"{module}.{name} ({loader})")
