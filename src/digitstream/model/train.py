"""`digitstream train`: choose a model by cross-validated accuracy, measure it
on held-out data, write a bundle.

The data set is split once, stratified, into a training part and a held-out
part (25% by default, fixed seed). The grid search fits and scores on the
training part only (stratified k-fold, accuracy); the best candidate is refit
on the whole training part and evaluated once on the held-out part, which no
choice has seen. That figure is what the card reports.

An augmentation (``--augment``, see :mod:`digitstream.model.augment`) adds
copies of the images a model is fitted on, after every split: each fold's
fitting side in the search, then the whole training part for the refit. The
images scored (each fold's validation side, the held-out part) are never
augmented, and no copy of them is fitted on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from joblib import Parallel, delayed
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text
from sklearn.base import clone
from sklearn.metrics import confusion_matrix
from sklearn.model_selection import ParameterGrid, StratifiedKFold, train_test_split
from threadpoolctl import threadpool_limits

from digitstream.datasets import Dataset, load_dataset
from digitstream.errors import UserError
from digitstream.model.augment import AUGMENTATIONS, augmented, check_augmentation
from digitstream.model.bundle import load_bundle, save_bundle
from digitstream.model.zoo import RECIPES, GridContext, ModelRecipe, get_recipe
from digitstream.monitor.profile import profile_of_split

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

CV_FOLDS = 5

# (fits done, fits in all) after each fit, the final refit included.
ProgressCallback = Callable[[int, int], None]


def describe_models() -> list[tuple[str, str]]:
    return [(recipe.name, recipe.description) for recipe in RECIPES.values()]


@dataclass
class Fitted:
    pipeline: Pipeline  # fitted on the (augmented) training part with the chosen parameters
    search: dict  # the card's "search" section
    fits: int  # fits the search made, the refit not counted
    n_fitted: int  # images the refit was fitted on, augmented copies included


@dataclass
class Split:
    X_train: np.ndarray
    X_test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray


@dataclass
class TrainResult:
    pipeline: Pipeline  # fitted
    card: dict  # everything model.json records except what save_bundle adds
    split: Split
    y_pred: np.ndarray  # the pipeline's predictions on split.X_test
    accuracy: float
    confusion: np.ndarray  # rows: true class, columns: predicted, in pipeline.classes_ order


def split_dataset(data: Dataset, test_size: float = 0.25, seed: int = 0) -> Split:
    """The stratified train/held-out split training uses, reproducible by seed."""
    try:
        X_train, X_test, y_train, y_test = train_test_split(
            data.X, data.y, test_size=test_size, stratify=data.y, random_state=seed
        )
    except ValueError as exc:
        raise UserError(
            f"cannot hold out {test_size:.0%} of {data.name} stratified by class: {exc}"
        ) from None
    return Split(X_train, X_test, y_train, y_test)


def train_model(
    data: Dataset,
    model_name: str = "pca-logistic",
    test_size: float = 0.25,
    seed: int = 0,
    jobs: int = 1,
    quick: bool = False,
    progress: ProgressCallback | None = None,
    augment: str | None = None,
) -> TrainResult:
    """Search, refit and evaluate one model; no output, no files.

    ``quick`` searches a grid of one or two candidates instead of the full
    one (for tests and smoke runs). ``augment`` names the augmentation; None
    takes the model's own (``shift`` for ``best``, ``none`` for the others).
    """
    recipe = get_recipe(model_name)
    augment = recipe.augment if augment is None else augment
    check_augmentation(augment, data.n_features)
    split = split_dataset(data, test_size, seed)
    started = time.perf_counter()
    fitted = fit_recipe(recipe, split.X_train, split.y_train, seed, jobs, quick, progress, augment)
    training_seconds = time.perf_counter() - started
    pipeline, search = fitted.pipeline, fitted.search
    with threadpool_limits(limits=1):
        y_pred = pipeline.predict(split.X_test)
    accuracy = float(np.mean(y_pred == split.y_test))
    confusion = confusion_matrix(split.y_test, y_pred, labels=pipeline.classes_)
    card = {
        "model": recipe.name,
        "description": recipe.description,
        "dataset": {
            "spec": data.name,
            "n_samples": len(data.y),
            "n_features": int(data.n_features),
            "value_range": [float(data.value_range[0]), float(data.value_range[1])],
        },
        "split": {
            "held_out_fraction": test_size,
            "seed": seed,
            "stratified": True,
            "n_train": len(split.y_train),
            "n_held_out": len(split.y_test),
        },
        "augment": augment,
        "n_fitted": fitted.n_fitted,
        "heldout_accuracy": accuracy,
        "confusion_matrix": confusion,
        "search": search,
        "training_seconds": round(training_seconds, 3),
        "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return TrainResult(pipeline, card, split, y_pred, accuracy, confusion)


def fit_recipe(
    recipe: ModelRecipe,
    X: np.ndarray,
    y: np.ndarray,
    seed: int = 0,
    jobs: int = 1,
    quick: bool = False,
    progress: ProgressCallback | None = None,
    augment: str = "none",
) -> Fitted:
    """Search ``recipe``'s grid by cross-validation on ``X``, ``y`` (the training
    part: nothing held out may be in it), then refit the best candidate on all of it,
    each fit on its images augmented by ``augment``."""
    from threadpoolctl import threadpool_limits  # start-up time: only a fit needs it

    # One BLAS thread per fit: these fits are small, and a second thread
    # contending for a busy core made them ~25x slower on the 2-core machine.
    # Parallelism comes from --jobs, one fit per process.
    with threadpool_limits(limits=1):
        search = _grid_search(recipe, X, y, seed, jobs, quick, progress, augment)
        pipeline = recipe.make_pipeline(seed).set_params(**search["best_params"])
        X_fit, y_fit = augmented(augment, X, y)
        pipeline.fit(X_fit, y_fit)
    if progress:
        progress(search["fits"] + 1, search["fits"] + 1)
    return Fitted(pipeline, search["card"], search["fits"], len(y_fit))


def main(
    dataset: str = "digits",
    model_name: str = "pca-logistic",
    output: str = "models",
    test_size: float = 0.25,
    seed: int = 0,
    jobs: int = 1,
    quick: bool = False,
    augment: str | None = None,
) -> Path:
    """`digitstream train`: train, print the held-out accuracy and confusion
    matrix, write the bundle to ``output``; returns its path."""
    # No markup: paths and labels are printed as they are.
    out = Console(highlight=False, soft_wrap=True, markup=False)
    recipe = get_recipe(model_name)
    augment = recipe.augment if augment is None else augment
    if jobs == 0 or jobs < -1:
        raise UserError(
            f"--jobs must be a positive number of processes or -1 (all cores), not {jobs}"
        )
    data = load_dataset(dataset)
    check_augmentation(augment, data.n_features)
    n_classes = len(np.unique(data.y))
    out.print(
        f"Data set {data.name}: {len(data.y)} images of {data.n_features} features, "
        f"{n_classes} classes; {test_size:.0%} held out (stratified, seed {seed})"
    )
    if augment != "none":
        out.print(
            f"Augmentation {augment}: {AUGMENTATIONS[augment]}, in each fit "
            "(never in a validation fold or the held-out part)"
        )
    err = Console(stderr=True)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("fits"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    ) as bar:
        task = bar.add_task(f"grid search {recipe.name}", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        result = train_model(data, recipe.name, test_size, seed, jobs, quick, progress, augment)
    search = result.card["search"]
    chosen = ", ".join(f"{key}={value!r}" for key, value in search["best_params"].items())
    if search["cv_folds"]:
        out.print(
            f"Grid search: {len(search['candidates'])} candidates x {search['cv_folds']} "
            f"folds by cross-validated accuracy on the training part; best {chosen} "
            f"(cv accuracy {search['best_cv_accuracy']:.4f})"
        )
    else:
        out.print(f"One candidate, nothing to search: {chosen}")
    correct = int(np.sum(result.y_pred == result.split.y_test))
    out.print(
        Text(f"Held-out accuracy: {result.accuracy:.4f}", style="bold"),
        f"({correct} of {len(result.split.y_test)} held-out images)",
    )
    if len(result.pipeline.classes_) <= 20:
        out.print(_confusion_table(result.pipeline.classes_, result.confusion))
    out.print(
        f"Training took {result.card['training_seconds']:.1f} s "
        f"(the refit on {result.card['n_fitted']:,} images)."
    )
    profile = profile_of_split(result.pipeline, result.split, data.value_range, data.name, seed)
    directory = save_bundle(result.pipeline, output, result.card, profile=profile)
    bundle = load_bundle(directory)
    out.print(
        f"Model bundle written to {directory}/ (pipeline.skops, model.json; "
        f"stages {' -> '.join(bundle.step_names)}; {bundle.content_hash[:19]}...)"
    )
    return directory


# ------------------------------------------------------------------ helpers
def _grid_search(
    recipe: ModelRecipe,
    X: np.ndarray,
    y: np.ndarray,
    seed: int,
    jobs: int,
    quick: bool,
    progress: ProgressCallback | None,
    augment: str,
) -> dict:
    classes, counts = np.unique(y, return_counts=True)
    folds_possible = int(counts.min())
    n_splits = min(CV_FOLDS, folds_possible)
    folds = []
    if n_splits >= 2:
        folds = list(StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(X, y))
    smallest_fit = min((len(train) for train, _ in folds), default=len(y))
    grid = recipe.make_grid(GridContext(X, smallest_fit), quick)
    candidates = list(ParameterGrid(grid))
    space = {key: list(values) for key, values in grid.items()}
    if len(candidates) == 1:
        # Nothing to choose between: cross-validation would only cost time.
        card = {
            "scoring": "accuracy",
            "cv_folds": 0,
            "space": space,
            "candidates": [{"params": candidates[0]}],
            "best_params": candidates[0],
            "best_cv_accuracy": None,
        }
        return {"best_params": candidates[0], "card": card, "fits": 0}
    if n_splits < 2:
        label = classes[int(np.argmin(counts))]
        raise UserError(
            f"class {label!r} has {folds_possible} training image(s): "
            "cross-validation needs at least 2 of every class"
        )
    template = recipe.make_pipeline(seed)
    fits = len(candidates) * len(folds)
    if progress:
        progress(0, fits + 1)
    scores = np.full((len(candidates), len(folds)), np.nan)
    tasks = (
        delayed(_fit_and_score)(template, candidates[c], X, y, folds[f], c, f, augment)
        for c in range(len(candidates))
        for f in range(len(folds))
    )
    done = 0
    try:
        for c, f, accuracy in Parallel(n_jobs=jobs, return_as="generator_unordered")(tasks):
            scores[c, f] = accuracy
            done += 1
            if progress:
                progress(done, fits + 1)
    except ValueError as exc:
        raise UserError(f"training {recipe.name} failed: {str(exc).splitlines()[0]}") from None
    mean, std = scores.mean(axis=1), scores.std(axis=1)
    best = int(np.argmax(mean))  # the first of equal means, as GridSearchCV
    card = {
        "scoring": "accuracy",
        "cv_folds": len(folds),
        "space": space,
        "candidates": [
            {"params": params, "cv_accuracy": round(float(m), 6), "cv_std": round(float(s), 6)}
            for params, m, s in zip(candidates, mean, std)
        ],
        "best_params": candidates[best],
        "best_cv_accuracy": float(mean[best]),
    }
    return {"best_params": candidates[best], "card": card, "fits": fits}


def _fit_and_score(
    template, params: dict, X: np.ndarray, y: np.ndarray, fold, c: int, f: int, augment: str
):
    train, test = fold
    # Only the fitting side is augmented: a shifted copy of a validation image
    # in the fit would inflate the score the candidates are chosen by.
    X_fit, y_fit = augmented(augment, X[train], y[train])
    model = clone(template).set_params(**params).fit(X_fit, y_fit)
    return c, f, float(np.mean(model.predict(X[test]) == y[test]))


def _confusion_table(classes, confusion: np.ndarray):
    table = Table(
        title="Confusion matrix on the held-out part (rows: true, columns: predicted)",
        title_justify="left",
        show_edge=False,
        pad_edge=False,
    )
    table.add_column("")
    for label in classes:
        table.add_column(Text(str(label)), justify="right")
    for i, (label, row) in enumerate(zip(classes, confusion)):
        cells = [
            Text(str(n), style="bold" if i == j else "") if n or i == j else Text("·", style="dim")
            for j, n in enumerate(row)
        ]
        table.add_row(Text(str(label)), *cells)
    return table
