"""Loading a pipeline from a skops file: only trusted types are built.

Loading never unpickles. skops rebuilds only the types it trusts by default
(scikit-learn estimators, NumPy and SciPy types and functions) plus those in
``TRUSTED_TYPES``; any other type in the file is refused, by name, before
anything is built, and every decision tree is checked before any prediction.
skops is imported through
:func:`~digitstream.model.skops_defaults.import_skops_io`, which spares it
importing every scikit-learn estimator to list the ones it trusts.

Used by :mod:`digitstream.model.bundle` to load a bundle, and by
:mod:`digitstream.model.stored` to load the real pipeline behind a stored one.
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np

from digitstream.errors import BundleError
from digitstream.model.skops_defaults import import_skops_io

# Types skops does not trust by default that fitted classifiers hold. Tree
# holds raw node indices scikit-learn follows without bounds checks, so every
# Tree is checked node by node after loading and before any prediction
# (_check_tree). KD and ball trees are left out on purpose for the same
# reason: save k-NN models with algorithm="brute".
TRUSTED_TYPES: tuple[str, ...] = (
    "sklearn.tree._tree.Tree",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
)


def load_trusted(data: bytes, source: Path):
    """The object in the skops file ``data`` (read from ``source``, named in errors),
    built only if every type in it is trusted, its decision trees checked.
    BundleError (one line) otherwise."""
    sio = import_skops_io()

    try:
        untrusted = sio.get_untrusted_types(data=data)
    except Exception as exc:
        raise BundleError(
            f"{source} is not a readable skops file: "
            f"{(str(exc) or type(exc).__name__).splitlines()[0]}"
        ) from None
    refused = sorted(set(untrusted) - set(TRUSTED_TYPES))
    if refused:
        plural = "s" if len(refused) > 1 else ""
        raise BundleError(
            f"{source} holds untrusted type{plural} {', '.join(refused)}; "
            "refusing to load it (only scikit-learn, NumPy and SciPy types "
            "known to be safe are loaded)"
        )
    try:
        pipeline = sio.loads(data, trusted=list(TRUSTED_TYPES))
    except Exception as exc:
        raise BundleError(
            f"cannot load {source}: {(str(exc) or type(exc).__name__).splitlines()[0]}"
        ) from None
    _check_trees(pipeline, source)
    return pipeline


def _check_trees(root, source: Path) -> None:
    # start-up time: imported on the start path, scikit-learn only once a pipeline is loaded
    from sklearn.tree import BaseDecisionTree
    from sklearn.tree._tree import Tree

    for owner, attribute, value in _walk(root):
        if isinstance(value, Tree):
            if not (isinstance(owner, BaseDecisionTree) and attribute == "tree_"):
                raise BundleError(
                    f"{source}: a decision tree structure outside a decision "
                    "tree estimator; refusing to load it"
                )
            problem = _check_tree(value, owner.n_features_in_)
            if problem:
                raise BundleError(
                    f"{source}: malformed decision tree ({problem}); refusing to load it"
                )


def _check_tree(tree, n_features: int) -> str | None:
    """Why scikit-learn could not safely walk this tree, or None."""
    count = tree.node_count
    if not 0 < count <= tree.capacity:
        return f"{count} nodes in storage for {tree.capacity}"
    if tree.n_features != n_features:
        return f"{tree.n_features} features in a model of {n_features}"
    left, right, feature = tree.children_left, tree.children_right, tree.feature
    node = np.arange(count)
    leaf = (left == -1) & (right == -1)
    # Children always come after their parent, so every walk ends at a leaf.
    inner = (
        (left > node)
        & (left < count)
        & (right > node)
        & (right < count)
        & (feature >= 0)
        & (feature < n_features)
    )
    bad = np.flatnonzero(~(leaf | inner))
    if bad.size:
        return f"node {int(bad[0])} has a child or feature index out of bounds"
    return None


def _walk(root):
    """Yield (owner, attribute, value) for everything reachable from root."""
    seen = set()
    stack = [(None, None, root)]
    while stack:
        owner, attribute, value = stack.pop()
        yield owner, attribute, value
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, dict):
            stack.extend((value, key, item) for key, item in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((value, i, item) for i, item in enumerate(value))
        elif isinstance(value, np.ndarray):
            if value.dtype == object:
                stack.extend((value, i, item) for i, item in enumerate(value.ravel()))
        elif hasattr(value, "__dict__") and not isinstance(value, (type, types.ModuleType)):
            stack.extend((value, key, item) for key, item in vars(value).items())
