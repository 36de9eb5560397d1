"""Check a bundle's held-out accuracy from outside digitstream, with scikit-learn and skops only.

    python docs/models/check_heldout.py MODEL_DIR

Rebuilds the split `digitstream train` made (scikit-learn's digits as float64,
the fraction and seed read from the card's "split", held out with
train_test_split stratified by label), loads MODEL_DIR/pipeline.skops with skops
(refusing any type skops does not trust by default), evaluates the pipeline on
the held-out images and prints its accuracy beside the card's
heldout_accuracy. Exit status 0 if the two are equal, 1 if not.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import skops.io as sio
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def main() -> int:
    bundle = Path(sys.argv[1])
    card = json.loads((bundle / "model.json").read_text())
    if card["dataset"]["spec"] != "digits" or not card["split"]["stratified"]:
        print(f"{bundle}: not trained on digits with a stratified split; nothing to check")
        return 1
    digits = load_digits()
    X, y = digits.data.astype(np.float64), digits.target
    _, X_test, _, y_test = train_test_split(
        X,
        y,
        test_size=card["split"]["held_out_fraction"],
        stratify=y,
        random_state=card["split"]["seed"],
    )
    untrusted = sio.get_untrusted_types(file=bundle / "pipeline.skops")
    if untrusted:
        print(f"{bundle}: refusing to load untrusted types {untrusted}")
        return 1
    pipeline = sio.load(bundle / "pipeline.skops")
    correct = int(np.sum(pipeline.predict(X_test) == y_test))
    accuracy = correct / len(y_test)
    print(
        f"{bundle}: {card['model']}, augment {card.get('augment', 'none')}: held-out accuracy "
        f"{accuracy:.4f} ({correct} of {len(y_test)}, split seed {card['split']['seed']}); "
        f"the card says {card['heldout_accuracy']:.4f}"
    )
    return 0 if accuracy == card["heldout_accuracy"] else 1


if __name__ == "__main__":
    sys.exit(main())
