"""The figures of the README's model table, for every model of the zoo (or those named).

    python docs/models/measure.py OUTPUT_DIR [MODEL ...]

Per model, on scikit-learn's digits, with the training of `digitstream train`
(grid search by 5-fold cross-validated accuracy on the training part, refit on
all of it, each fit augmented as the model is by default):

* the held-out accuracy on the standard protocol (stratified 25% held out,
  seed 0), the training time (search and refit, one process) and the chosen
  parameters; the bundle is written to OUTPUT_DIR/MODEL, as `digitstream train
  --model MODEL --output OUTPUT_DIR/MODEL` writes it;
* the accuracy on the ordered split of scikit-learn's digits example: the
  first half (898 images) to train, the second half (899) to test.

load_digits is the UCI test set of optdigits: 1,797 images by 13 writers, so
both protocols have the same writers on the two sides of the split.
"""

from __future__ import annotations

import sys

import numpy as np
from sklearn.model_selection import train_test_split

from digitstream.datasets import load_dataset
from digitstream.model.bundle import save_bundle
from digitstream.model.train import fit_recipe, train_model
from digitstream.model.zoo import RECIPES, get_recipe


def main() -> int:
    output = sys.argv[1]
    names = sys.argv[2:] or list(RECIPES)
    data = load_dataset("digits")
    # scikit-learn's "Recognizing hand-written digits" example splits this way.
    X_first, X_second, y_first, y_second = train_test_split(
        data.X, data.y, test_size=0.5, shuffle=False
    )
    print("| model | augment | held-out (stratified 25%, seed 0) | ordered split | training |")
    print("|---|---|--:|--:|--:|")
    for name in names:
        recipe = get_recipe(name)
        result = train_model(data, name, seed=0)
        save_bundle(result.pipeline, f"{output}/{name}", result.card)
        ordered = fit_recipe(recipe, X_first, y_first, seed=0, augment=recipe.augment)
        ordered_accuracy = float(np.mean(ordered.pipeline.predict(X_second) == y_second))
        chosen = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in result.card["search"]["best_params"].items()
        )
        print(
            f"| {name} | {recipe.augment} | {result.accuracy:.4f} | {ordered_accuracy:.4f} "
            f"| {result.card['training_seconds']:.1f} s | {chosen}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
