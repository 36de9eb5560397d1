"""The models `digitstream train` can build.

Each recipe is one scikit-learn pipeline, with step names a person reads
(they become the stage names in metrics), and the grid it is searched over.
Grids are small on purpose: each model trains on the digits set in well under
half a minute on two cores. ``quick`` grids hold one or two candidates, for
tests and smoke runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.decomposition import PCA
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from digitstream.errors import UserError

ParamGrid = dict[str, list]


@dataclass(frozen=True)
class GridContext:
    """What a grid may depend on: the data the search fits on."""

    X: np.ndarray  # the training part, (n_samples, n_features) float64
    smallest_fit: int  # fewest samples any cross-validation fit sees

    @property
    def n_features(self) -> int:
        return self.X.shape[1]


@dataclass(frozen=True)
class ModelRecipe:
    name: str
    description: str
    make_pipeline: Callable[[int], Pipeline]  # seed -> unfitted pipeline
    make_grid: Callable[[GridContext, bool], ParamGrid]  # (context, quick) -> grid
    augment: str = "none"  # trained with this augmentation unless --augment names another


def _capped(values, cap: int) -> list[int]:
    return sorted({min(v, cap) for v in values})


# ------------------------------------------------------------- pca-logistic
def _pca_logistic(seed: int) -> Pipeline:
    # lbfgs needs a few hundred iterations on unscaled pixels at large C; the
    # generous cap keeps every candidate converged instead of warning.
    return Pipeline(
        [
            ("PCA", PCA(random_state=seed)),
            ("Logistic Regression", LogisticRegression(max_iter=10_000)),
        ]
    )


def _pca_logistic_grid(ctx: GridContext, quick: bool) -> ParamGrid:
    # PCA cannot keep more components than a fold has samples or features.
    cap = min(ctx.n_features, ctx.smallest_fit)
    if quick:
        return {"PCA__n_components": _capped([40], cap), "Logistic Regression__C": [0.1]}
    # The seed searched C over {2, 3, 4}; smaller C regularises better on
    # unscaled pixels, so the search reaches down to 0.01 as well.
    return {
        "PCA__n_components": _capped([20, 40, 64], cap),
        "Logistic Regression__C": [0.01, 0.1, 1.0, 2.0, 3.0, 4.0],
    }


# ---------------------------------------------------------------------- svc
def _svc(seed: int) -> Pipeline:
    return Pipeline([("RBF SVM", SVC(kernel="rbf"))])


def _svc_grid(ctx: GridContext, quick: bool) -> ParamGrid:
    # gamma around scikit-learn's "scale" heuristic, so one grid suits pixels
    # in 0..16 (digits) and in 0..255 (MNIST) alike.
    variance = float(ctx.X.var()) or 1.0
    scale = 1.0 / (ctx.n_features * variance)
    if quick:
        return {"RBF SVM__C": [3.0], "RBF SVM__gamma": [scale]}
    return {"RBF SVM__C": [1.0, 3.0, 10.0], "RBF SVM__gamma": [scale, 2 * scale, 4 * scale]}


# ---------------------------------------------------------------------- knn
def _knn(seed: int) -> Pipeline:
    # Brute force keeps the fitted model free of KD/ball-tree index arrays,
    # which the bundle loader does not trust (see trusted.TRUSTED_TYPES).
    return Pipeline([("k-Nearest Neighbors", KNeighborsClassifier(algorithm="brute"))])


def _knn_grid(ctx: GridContext, quick: bool) -> ParamGrid:
    if quick:
        return {
            "k-Nearest Neighbors__n_neighbors": _capped([3], ctx.smallest_fit),
            "k-Nearest Neighbors__weights": ["distance"],
        }
    return {
        "k-Nearest Neighbors__n_neighbors": _capped([1, 3, 5, 7], ctx.smallest_fit),
        "k-Nearest Neighbors__weights": ["uniform", "distance"],
    }


# ------------------------------------------------------------ random-forest
def _random_forest(seed: int) -> Pipeline:
    return Pipeline([("Random Forest", RandomForestClassifier(random_state=seed, n_jobs=1))])


def _random_forest_grid(ctx: GridContext, quick: bool) -> ParamGrid:
    if quick:
        return {"Random Forest__n_estimators": [30], "Random Forest__max_features": ["sqrt"]}
    return {
        "Random Forest__n_estimators": [100, 200],
        "Random Forest__max_features": ["sqrt", "log2"],
    }


# ---------------------------------------------------------------------- mlp
def _mlp(seed: int) -> Pipeline:
    # A larger first step than adam's default converges in ~60 epochs instead
    # of ~250 on digits, at the same held-out accuracy.
    return Pipeline(
        [
            ("Standard Scaler", StandardScaler()),
            (
                "Neural Network",
                MLPClassifier(learning_rate_init=0.01, max_iter=1000, random_state=seed),
            ),
        ]
    )


def _mlp_grid(ctx: GridContext, quick: bool) -> ParamGrid:
    if quick:
        return {"Neural Network__hidden_layer_sizes": [(64,)], "Neural Network__alpha": [1.0]}
    return {
        "Neural Network__hidden_layer_sizes": [(64,), (128,)],
        "Neural Network__alpha": [0.3, 1.0],
    }


RECIPES: dict[str, ModelRecipe] = {
    recipe.name: recipe
    for recipe in [
        ModelRecipe(
            "pca-logistic",
            "PCA then logistic regression (the seed's model); "
            "linear, so it is served fused into one affine map",
            _pca_logistic,
            _pca_logistic_grid,
        ),
        ModelRecipe("svc", "support vector machine with an RBF kernel", _svc, _svc_grid),
        ModelRecipe(
            "best",
            "the strongest here: svc trained with --augment shift "
            "(the training images and their one-pixel shifts)",
            _svc,
            _svc_grid,
            augment="shift",
        ),
        ModelRecipe("knn", "k-nearest neighbours (brute force)", _knn, _knn_grid),
        ModelRecipe(
            "random-forest", "random forest of decision trees", _random_forest, _random_forest_grid
        ),
        ModelRecipe(
            "mlp", "standard scaling then a one-hidden-layer neural network", _mlp, _mlp_grid
        ),
    ]
}


def get_recipe(name: str) -> ModelRecipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise UserError(f"unknown model {name!r}: choose one of {', '.join(RECIPES)}") from None
