"""``digitstream profile``: add a reference profile to a model bundle or ``.skops`` file."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from digitstream.datasets import load_dataset
from digitstream.errors import UserError
from digitstream.model.bundle import load_bundle, profile_path, save_profile
from digitstream.model.train import split_dataset
from digitstream.monitor.profile import profile_of_split


def main(model_path: str, dataset: str, test_size: float = 0.25, seed: int = 0) -> Path:
    """Profile the model at ``model_path`` on ``dataset``: split as ``train`` splits it
    (stratified, ``test_size`` held out, ``seed``), the training part as the reference,
    the held-out part for the classes, the calibration and the thresholds. Returns where
    the profile was written."""
    out = Console(highlight=False, soft_wrap=True, markup=False)
    bundle = load_bundle(model_path, with_profile=False)
    data = load_dataset(dataset)
    if data.n_features != bundle.n_features:
        raise UserError(
            f"{data.name} has {data.n_features} features, the model at {model_path} takes "
            f"{bundle.n_features}"
        )
    split = split_dataset(data, test_size, seed)
    profile = profile_of_split(bundle.pipeline, split, data.value_range, data.name, seed)
    replaced = " (replacing the one it had)" if profile_path(bundle.path).exists() else ""
    target = save_profile(bundle, profile)
    out.print(f"Reference profile written to {target}{replaced}:")
    for line in profile.summary():
        out.print(f"  {line}")
    return target
