"""Model bundles: a fitted pipeline saved with skops, and the card that says
what it is.

A bundle is a directory holding ``pipeline.skops`` and ``model.json``. The
card (``model.json``) records the data set, held-out accuracy, classes, number
of features, step names, library versions, search space, chosen parameters,
training time, and the SHA-256 of ``pipeline.skops``, checked on every load.
A single ``.skops`` file is accepted too; its card is then derived from the
pipeline itself.

A bundle may hold the model's reference profile (:mod:`digitstream.monitor.profile`):
``profile.json`` in a directory (the card names it), ``NAME.profile.json`` beside
``NAME.skops``. The profile names the content hash of the pipeline it describes, and the
bundle's content hash then covers both files: it is the SHA-256 of the two files' SHA-256
digests (without a profile, the SHA-256 of ``pipeline.skops``, as ``sha256sum`` says; the
card keeps that one as ``pipeline_hash`` too).

Loading never unpickles: the pipeline is built by
:func:`~digitstream.model.trusted.load_trusted`, which refuses any type it does
not trust, by name, before anything is built.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from digitstream.errors import BundleError
from digitstream.model.runner import make_runner, n_features_of, pipeline_steps
from digitstream.model.skops_defaults import import_skops_io
from digitstream.model.stored import StoredPipeline, read_stored
from digitstream.model.trusted import TRUSTED_TYPES, load_trusted
from digitstream.monitor.profile import PROFILE_FILE, Profile, with_pipeline_hash

PIPELINE_FILE = "pipeline.skops"
CARD_FILE = "model.json"
CARD_FORMAT = "digitstream-model-bundle/1"


@dataclass(frozen=True)
class Bundle:
    pipeline: object  # the fitted scikit-learn classifier (usually a Pipeline)
    card: dict  # model.json, or a card derived from the pipeline
    path: Path  # the bundle directory or the .skops file
    n_features: int
    classes: np.ndarray
    step_names: list[str]
    content_hash: str  # "sha256:<hex>" of the .skops file (and its profile, if it has one)
    profile: Profile | None = None  # the reference profile, if the bundle holds one


def content_hash(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def bundle_hash(pipeline_data: bytes, profile_data: bytes | None) -> str:
    """A bundle's content hash: of its pipeline file, or of the pipeline file and its
    profile together (see the module doc)."""
    if profile_data is None:
        return content_hash(pipeline_data)
    both = hashlib.sha256(pipeline_data).digest() + hashlib.sha256(profile_data).digest()
    return content_hash(both)


def profile_path(path) -> Path:
    """Where the profile of the bundle at ``path`` is: ``profile.json`` in a directory,
    ``NAME.profile.json`` beside ``NAME.skops``."""
    path = Path(path)
    return path / PROFILE_FILE if path.is_dir() else path.with_name(path.stem + ".profile.json")


def profile_bytes(profile: Profile) -> bytes:
    """The profile's file."""
    return (json.dumps(profile.to_json(), separators=(",", ":")) + "\n").encode()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("digitstream", "numpy", "scipy", "scikit-learn", "skops"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def save_bundle(pipeline, directory, card: dict, profile: Profile | None = None) -> Path:
    """Write ``pipeline``, its reference ``profile`` (if given) and its card into
    ``directory`` (created if needed).

    The card is completed with what can be read off the pipeline (classes,
    features, step names), the library versions and the content hash. Every
    file is written under a temporary name and renamed into place,
    ``model.json`` last, so a reader never sees half a file and a bundle is
    complete once its ``model.json`` is new. Returns the directory.
    """
    sio = import_skops_io()

    _check_classifier(pipeline, "the pipeline to save")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = sio.dumps(pipeline)
    refused = sorted(set(sio.get_untrusted_types(data=data)) - set(TRUSTED_TYPES))
    if refused:
        raise BundleError(
            f"refusing to save a pipeline that could not be loaded again: "
            f"untrusted type {', '.join(refused)}"
        )
    facts = _facts(pipeline)
    profile_data = None
    if profile is not None:
        _check_profile(profile, facts, "the profile to save")
        profile_data = profile_bytes(with_pipeline_hash(profile, content_hash(data)))
    full_card = {
        "format": CARD_FORMAT,
        **{k: v for k, v in card.items() if k not in ("profile_file", "pipeline_hash")},
        **facts,
        "versions": library_versions(),
        "pipeline_file": PIPELINE_FILE,
        **({"profile_file": PROFILE_FILE} if profile_data is not None else {}),
        "pipeline_hash": content_hash(data),
        "content_hash": bundle_hash(data, profile_data),
    }
    _write_atomically(directory / PIPELINE_FILE, data)
    if profile_data is not None:
        _write_atomically(directory / PROFILE_FILE, profile_data)
    _write_atomically(directory / CARD_FILE, (format_card(full_card) + "\n").encode())
    if profile_data is None:
        (directory / PROFILE_FILE).unlink(missing_ok=True)  # one the card no longer names
    return directory


def save_profile(bundle: Bundle, profile: Profile) -> Path:
    """Add ``profile`` to ``bundle`` (loaded with ``with_profile=False``), replacing the
    one it has: into a directory as ``profile.json``, its card rewritten to name it (last,
    as :func:`save_bundle` does); beside a ``.skops`` file as ``NAME.profile.json``. The
    pipeline file is left as it is (BundleError if it changed since it was loaded).
    Returns where the profile went."""
    path = bundle.path
    card, _, data, _, _ = _read_files(path, with_profile=False)
    if content_hash(data) != bundle.content_hash:
        raise BundleError(f"the pipeline at {path} changed while it was profiled: try again")
    _check_profile(profile, _facts(bundle.pipeline), "the profile")
    profile_data = profile_bytes(with_pipeline_hash(profile, content_hash(data)))
    target = profile_path(path)
    _write_atomically(target, profile_data)
    if card is not None:
        card = {
            **{k: v for k, v in card.items() if k not in ("content_hash", "profile_file")},
            "profile_file": PROFILE_FILE,
            "pipeline_hash": content_hash(data),
            "content_hash": bundle_hash(data, profile_data),
        }
        _write_atomically(path / CARD_FILE, (format_card(card) + "\n").encode())
    return target


def bundle_files(path) -> dict[str, bytes]:
    """The files of the bundle at ``path`` as they are now, by name: of a directory, its
    pipeline, its profile if the card names one, and its card (last); of a ``.skops``
    file, the file and its profile beside it, if any. Nothing is checked here."""
    path = Path(path)
    try:
        if path.is_dir():
            card = _read_card(path)
            names = [PIPELINE_FILE, *([PROFILE_FILE] if card.get("profile_file") else [])]
            return {name: (path / name).read_bytes() for name in [*names, CARD_FILE]}
        files = {path.name: path.read_bytes()}
        if profile_path(path).exists():
            files[profile_path(path).name] = profile_path(path).read_bytes()
        return files
    except OSError as exc:
        raise BundleError(f"cannot read the bundle at {path}: {exc.strerror or exc}") from None


def files_hash(files: dict[str, bytes], path) -> str:
    """The content hash of a bundle's ``files`` (from :func:`bundle_files`)."""
    path = Path(path)
    if CARD_FILE in files:
        return bundle_hash(files[PIPELINE_FILE], files.get(PROFILE_FILE))
    return bundle_hash(files[path.name], files.get(profile_path(path).name))


def write_bundle_files(directory, files: dict[str, bytes]) -> None:
    """Write a bundle directory's ``files`` (from :func:`bundle_files` of another one) into
    ``directory``, each renamed into place, ``model.json`` last, as :func:`save_bundle`
    writes; a profile the new card does not name is removed after it."""
    directory = Path(directory)
    for name, data in files.items():
        if name != CARD_FILE:
            _write_atomically(directory / name, data)
    _write_atomically(directory / CARD_FILE, files[CARD_FILE])
    if PROFILE_FILE not in files:
        (directory / PROFILE_FILE).unlink(missing_ok=True)


def write_skops(path, pipeline_data: bytes, profile_data: bytes | None) -> None:
    """Write a single ``.skops`` file and its profile beside it (or remove the profile it
    had, if ``profile_data`` is None), each renamed into place."""
    path = Path(path)
    _write_atomically(path, pipeline_data)
    if profile_data is not None:
        _write_atomically(profile_path(path), profile_data)
    else:
        profile_path(path).unlink(missing_ok=True)


def peek(path) -> tuple[str | None, bool]:
    """The content hash of the bundle files at ``path`` as they are now (None if they
    cannot be read), and whether a card names that hash (a bundle directory whose writer
    has finished). Cheap: nothing is loaded."""
    path = Path(path)
    is_dir = path.is_dir()
    try:
        data = (path / PIPELINE_FILE if is_dir else path).read_bytes()
        card = json.loads((path / CARD_FILE).read_text(encoding="utf-8")) if is_dir else None
    except (OSError, ValueError):
        return None, False
    if is_dir and not isinstance(card, dict):
        return None, False
    named = card.get("profile_file") if card is not None else None
    try:
        if card is None and profile_path(path).exists():
            named = profile_path(path).name
        profile_data = profile_path(path).read_bytes() if named else None
    except OSError:
        return None, False
    digest = bundle_hash(data, profile_data)
    return digest, card is not None and card.get("content_hash") == digest


def load_bundle(path, with_profile: bool = True) -> Bundle:
    """Load and check a bundle directory or a single ``.skops`` file.

    Raises BundleError (one line) for a missing file, a hash that does not
    match the card, an untrusted type, a malformed tree, or an object that is
    not a fitted classifier. ``with_profile=False`` leaves its reference profile
    out (unread, unchecked: the pipeline is checked against its own hash).
    """
    path = Path(path)
    card, skops_path, data, digest, profile = _read_files(path, with_profile)
    return _loaded(path, card, skops_path, data, digest, profile)


def load_bundle_stored(path) -> Bundle | None:
    """A bundle directory whose pipeline is served fused, read without scikit-learn.

    The bundle's pipeline is then a :class:`~digitstream.model.stored.StoredPipeline`;
    :func:`finish_loading` loads the real one (with every check of :func:`load_bundle`)
    and hands it over. The files are checked as :func:`load_bundle` checks them (the
    same BundleError); None if ``path`` is a lone ``.skops`` file or the pipeline holds
    anything :func:`~digitstream.model.stored.read_stored` does not read.
    """
    path = Path(path)
    card, skops_path, data, digest, profile = _read_files(path)
    stored = read_stored(data) if card is not None else None
    if stored is None:
        return None
    return _checked(stored, path, card, skops_path, digest, profile)


def finish_loading(bundle: Bundle) -> Bundle:
    """Load the real pipeline of a bundle from :func:`load_bundle_stored`, check that it
    is fused into exactly the map its stored arrays gave, and hand it to the stored
    pipeline (or the error, which is also raised: BundleError)."""
    stored = bundle.pipeline
    assert isinstance(stored, StoredPipeline), "a bundle from load_bundle_stored"
    skops_path = bundle.path / PIPELINE_FILE
    try:
        full = _loaded(
            bundle.path, bundle.card, skops_path, stored.data, bundle.content_hash, bundle.profile
        )
        if not make_runner(stored).same_map(make_runner(full.pipeline)):
            raise BundleError(
                f"{skops_path}: the pipeline as loaded by skops does not match its stored "
                "arrays; serve it with --no-compile"
            )
    except BaseException as exc:
        stored.fail(exc)
        raise
    stored.resolve(full.pipeline)
    return full


def _read_files(
    path: Path, with_profile: bool = True
) -> tuple[dict | None, Path, bytes, str, Profile | None]:
    """The card (None for a lone .skops file), the pipeline file, its bytes, the bundle's
    content hash (checked against the card) and its profile, if it has one (and
    ``with_profile``)."""
    if path.is_dir():
        card = _read_card(path)
        skops_path = path / PIPELINE_FILE
    elif path.is_file() and path.suffix == ".skops":
        card, skops_path = None, path
    elif not path.exists():
        raise BundleError(
            f"no model bundle at {path}: expected a directory holding "
            f"{CARD_FILE} and {PIPELINE_FILE}, or a .skops file "
            "(`digitstream train` writes one)"
        )
    else:
        raise BundleError(f"{path} is neither a model bundle directory nor a .skops file")
    try:
        data = skops_path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"incomplete model bundle {path}: {PIPELINE_FILE} is missing") from None
    except OSError as exc:
        raise BundleError(f"cannot read {skops_path}: {exc.strerror}") from None
    profile = profile_data = None
    if with_profile:
        profile, profile_data = _read_profile(path, card, data)
    digest = bundle_hash(data, profile_data)
    if card is not None and "content_hash" not in card:
        raise BundleError(
            f"{path / CARD_FILE} records no content_hash, so {PIPELINE_FILE} "
            "cannot be checked; write bundles with `digitstream train` or "
            "save_bundle, or serve the .skops file alone"
        )
    said = card["content_hash"] if card is not None else None
    if card is not None and not with_profile and card.get("profile_file") is not None:
        said = card.get("pipeline_hash")  # the pipeline file alone, its profile left out
    if card is not None and said != digest:
        raise BundleError(
            f"{skops_path} does not match {path / CARD_FILE}: content hash is "
            f"{digest}, the card says {said}; the file was "
            "changed after the bundle was written"
        )
    return card, skops_path, data, digest, profile


def _read_profile(
    path: Path, card: dict | None, data: bytes
) -> tuple[Profile | None, bytes | None]:
    """The bundle's profile and its file's bytes (None, None if it has none); BundleError
    for one that cannot be read or describes another pipeline."""
    where = profile_path(path)
    if card is not None:
        named = card.get("profile_file")
        if named is None:
            return None, None
        if named != PROFILE_FILE:
            raise BundleError(
                f"{path / CARD_FILE} names profile_file {named!r}, not {PROFILE_FILE}"
            )
    elif not where.exists():
        return None, None
    try:
        profile_data = where.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"incomplete model bundle {path}: {where.name} is missing") from None
    except OSError as exc:
        raise BundleError(f"cannot read {where}: {exc.strerror}") from None
    try:
        profile = Profile.from_json(json.loads(profile_data))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(
            f"{where} is not a reference profile: {str(exc).splitlines()[0]}"
        ) from None
    if profile.pipeline_hash != content_hash(data):
        raise BundleError(
            f"{where} describes another pipeline ({profile.pipeline_hash}, the pipeline file is "
            f"{content_hash(data)}): run `digitstream profile` again, or remove it"
        )
    return profile, profile_data


def _loaded(
    path: Path,
    card: dict | None,
    skops_path: Path,
    data: bytes,
    digest: str,
    profile: Profile | None,
) -> Bundle:
    return _checked(load_trusted(data, skops_path), path, card, skops_path, digest, profile)


def _checked(
    pipeline,
    path: Path,
    card: dict | None,
    skops_path: Path,
    digest: str,
    profile: Profile | None,
) -> Bundle:
    """The bundle of a loaded (or stored) pipeline, checked against its card, or with a
    card derived from it."""
    _check_classifier(pipeline, str(skops_path))
    facts = _facts(pipeline)
    if card is None:
        card = {
            "format": CARD_FORMAT,
            "derived_from": str(skops_path),
            **facts,
            "pipeline_file": skops_path.name,
            **({"profile_file": profile_path(path).name} if profile is not None else {}),
            "content_hash": digest,
        }
    else:
        _check_card_matches(card, facts, path)
    if profile is not None:
        _check_profile(profile, facts, str(profile_path(path)))
    return Bundle(
        pipeline=pipeline,
        card=card,
        path=path,
        n_features=facts["n_features"],
        classes=np.asarray(pipeline.classes_),
        step_names=facts["steps"],
        content_hash=digest,
        profile=profile,
    )


def inspect_main(path) -> int:
    """`digitstream inspect PATH`: print the card, check the bundle; 0 if it
    can be served, else 1 with a one-line reason."""
    from rich.console import Console  # start-up time: only this command prints a card

    out, err = Console(), Console(stderr=True)
    try:
        bundle = load_bundle(path)
    except BundleError as exc:
        card = _try_read_card(Path(path))
        if card is not None:
            out.print(format_card(card), markup=False, highlight=False, soft_wrap=True)
        err.print(f"Error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return 1
    out.print(format_card(bundle.card), markup=False, highlight=False, soft_wrap=True)
    if bundle.profile is not None:
        out.print(f"reference profile ({profile_path(bundle.path).name}):", highlight=False)
        for line in bundle.profile.summary():
            out.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
    else:
        out.print(
            "no reference profile: drift is not judged (`digitstream profile --model PATH "
            "--dataset SPEC` adds one)",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    try:
        runner = make_runner(bundle.pipeline)
        runner.predict(np.zeros((2, bundle.n_features)), want_confidence=True)
    except Exception as exc:
        err.print(
            f"Error: {bundle.path}: the pipeline fails on a test batch: "
            f"{(str(exc) or type(exc).__name__).splitlines()[0]}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        return 1
    served = "fused into one affine map" if runner.compiled else "step by step"
    checked = (
        "card derived from the file"
        if "derived_from" in bundle.card
        else "content hash matches the card"
    )
    out.print(
        f"OK: {bundle.path}: {bundle.content_hash}, {checked}; every type trusted; "
        f"a classifier of {bundle.n_features} features into {len(bundle.classes)} classes; "
        f"stages {' -> '.join(bundle.step_names)}, served {served}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    return 0


def format_card(card: dict) -> str:
    """The card as JSON, indented, with lists of plain values (classes, rows of
    the confusion matrix) kept on one line."""
    return _format_json(_jsonable(card), "")


# ------------------------------------------------------------------ helpers
def _format_json(value, indent: str) -> str:
    inner = indent + "  "
    one_line = json.dumps(value)
    if len(one_line) <= 120 and not _holds_nested_container(value):
        return one_line
    if isinstance(value, dict) and value:
        items = [
            f"{inner}{json.dumps(key)}: {_format_json(item, inner)}" for key, item in value.items()
        ]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value):
        items = [inner + _format_json(item, inner) for item in value]
        return "[\n" + ",\n".join(items) + "\n" + indent + "]"
    return one_line


def _holds_nested_container(value) -> bool:
    """Lists of plain values and dicts of plain values or such lists fit one line."""
    if isinstance(value, dict):
        return any(
            isinstance(item, dict) or (isinstance(item, list) and _holds_nested_container(item))
            for item in value.values()
        )
    if isinstance(value, list):
        return any(isinstance(item, (dict, list)) for item in value)
    return False


def _facts(pipeline) -> dict:
    return {
        "classes": np.asarray(pipeline.classes_).tolist(),
        "n_features": n_features_of(pipeline),
        "steps": [name for name, _ in pipeline_steps(pipeline)],
        "estimators": [
            type(step).__module__ + "." + type(step).__qualname__
            for _, step in pipeline_steps(pipeline)
        ],
    }


def _check_profile(profile: Profile, facts: dict, what: str) -> None:
    classes = [str(c) for c in facts["classes"]]
    if profile.n_features != facts["n_features"] or profile.classes != classes:
        raise BundleError(
            f"{what} describes a model of {profile.n_features} features and classes "
            f"{' '.join(profile.classes)}, the pipeline takes {facts['n_features']} and "
            f"predicts {' '.join(classes)}"
        )


def _check_card_matches(card: dict, facts: dict, path: Path) -> None:
    for key in ("n_features", "classes", "steps"):
        if key in card and card[key] != facts[key]:
            raise BundleError(
                f"{path / CARD_FILE} says {key} is {card[key]!r} but the pipeline "
                f"has {facts[key]!r}"
            )


def _read_card(directory: Path) -> dict:
    card_path = directory / CARD_FILE
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"incomplete model bundle {directory}: {CARD_FILE} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"cannot read {card_path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(card, dict):
        raise BundleError(f"{card_path} is not a model card (expected a JSON object)")
    return card


def _try_read_card(path: Path) -> dict | None:
    try:
        return _read_card(path) if path.is_dir() else None
    except BundleError:
        return None


def _check_classifier(obj, what: str) -> None:
    name = type(obj).__name__
    if not callable(getattr(obj, "predict", None)):
        raise BundleError(f"{what} is not a classifier: a {name} has no predict method")
    try:
        classes = obj.classes_
        n_features = n_features_of(obj)
    except (AttributeError, IndexError, TypeError, ValueError):
        raise BundleError(
            f"{what} is not a fitted classifier: its {name} has no classes_ "
            "or n_features_in_ (is it fitted, and does it end in a classifier?)"
        ) from None
    if n_features < 1:
        raise BundleError(f"{what}: n_features_in_ is {n_features}, expected a positive integer")
    if np.ndim(classes) != 1 or len(classes) < 2:
        raise BundleError(f"{what}: classes_ must list at least two classes")


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _jsonable(value):
    """Plain JSON types for cards: NumPy scalars and arrays, tuples become
    numbers and lists; anything else becomes its repr."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)
