"""``digitstream promote --model DIR --shadow PATH``: the shadow model becomes the served one,
and the served one the shadow.

Only files change: the shadow's bundle is written into ``DIR`` and the served one's to
``PATH``, each file renamed into place, the card last, as ``train`` writes. A ``run``
serving ``DIR`` with ``--shadow PATH`` takes both through its swaps (nothing lost, each
message answered by one model, the swap's log line); without one running, the next start
serves the promoted model. Both bundles are read and checked (loaded, the same features and
classes) before anything is written.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from digitstream.errors import UserError
from digitstream.model.bundle import (
    CARD_FILE,
    PIPELINE_FILE,
    PROFILE_FILE,
    bundle_files,
    files_hash,
    load_bundle,
    profile_path,
    save_bundle,
    write_bundle_files,
    write_skops,
)


def main(model_dir: str, shadow_path: str) -> None:
    out = Console(highlight=False, soft_wrap=True, markup=False)
    served_path, shadow_at = Path(model_dir), Path(shadow_path)
    if not served_path.is_dir():
        raise UserError(f"--model {model_dir} is not a model bundle directory")
    served_files, shadow_files = bundle_files(served_path), bundle_files(shadow_at)
    served, shadow = load_bundle(served_path), load_bundle(shadow_at)
    if (files_hash(served_files, served_path), files_hash(shadow_files, shadow_at)) != (
        served.content_hash,
        shadow.content_hash,
    ):
        raise UserError("a bundle changed while it was read: try again")
    classes = [str(c) for c in served.classes]
    if shadow.n_features != served.n_features or [str(c) for c in shadow.classes] != classes:
        raise UserError(
            f"the shadow at {shadow_path} takes {shadow.n_features} features into classes "
            f"{' '.join(map(str, shadow.classes))}, the model at {model_dir} {served.n_features} "
            f"into {' '.join(classes)}: a run swaps only a model of the same features and classes"
        )
    if served.content_hash == shadow.content_hash:
        out.print(f"{model_dir} and {shadow_path} hold the same model: nothing to promote")
        return
    # the shadow becomes the served model ...
    if shadow_at.is_dir():
        write_bundle_files(served_path, shadow_files)
    else:
        save_bundle(shadow.pipeline, served_path, {"promoted_from": str(shadow_at)}, shadow.profile)
    # ... and the served model the shadow
    if shadow_at.is_dir():
        write_bundle_files(shadow_at, served_files)
    else:
        profile = served_files.get(PROFILE_FILE) if CARD_FILE in served_files else None
        write_skops(shadow_at, served_files[PIPELINE_FILE], profile)
    promoted = load_bundle(served_path)
    out.print(
        f"promoted: {model_dir} now holds the model that was the shadow "
        f"({' -> '.join(promoted.step_names)}, {promoted.content_hash}); {shadow_path} holds the "
        f"one that was served ({served.content_hash}"
        + (
            f", its profile beside it as {profile_path(shadow_at).name}"
            if not shadow_at.is_dir() and PROFILE_FILE in served_files
            else ""
        )
        + ")"
    )
