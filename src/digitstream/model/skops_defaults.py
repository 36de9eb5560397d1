"""skops.io without the cost of computing its default trusted types.

``skops.io`` imports ``skops.io._trusted_types`` first thing, and that module
computes the type names skops trusts without being told: every scikit-learn
estimator (found by importing every scikit-learn module, half a second and
more), scikit-learn's internal loss and binning types, the ufuncs of NumPy and
``scipy.special``, NumPy's dtypes and bit generators, a few builtins. Those
names depend only on the installed versions of skops, scikit-learn, SciPy and
NumPy, so :mod:`digitstream.model._skops_defaults_data` holds them as computed
for one set of versions.

:func:`import_skops_io` imports ``skops.io`` with a module holding those
names in the place of ``skops.io._trusted_types`` when the installed versions
are exactly the recorded ones, and plainly otherwise. skops then trusts, and
refuses, exactly the types it would have: the same names in the same lists.
The test suite compares the recorded names with what skops computes.

After an upgrade of any of those packages the names no longer apply (and
``skops.io`` is imported the slow way) until they are recorded again::

    python -m digitstream.model.skops_defaults
"""

from __future__ import annotations

import platform
import sys
import types
from pathlib import Path

#: the module skops computes its default trusted types in
TRUSTED_TYPES_MODULE = "skops.io._trusted_types"
#: the lists of type names skops' loaders read from it
NAME_LISTS = (
    "PRIMITIVE_TYPE_NAMES",
    "CONTAINER_TYPE_NAMES",
    "SKLEARN_ESTIMATOR_TYPE_NAMES",
    "SKLEARN_INTERNAL_TYPE_NAMES",
    "SCIPY_UFUNC_TYPE_NAMES",
    "NUMPY_UFUNC_TYPE_NAMES",
    "NUMPY_RANDOM_BIT_GENERATOR_TYPE_NAMES",
    "NUMPY_DTYPE_TYPE_NAMES",
)
#: marks the module that stands in for skops' own
RECORDED = "__digitstream_recorded__"


def installed_versions() -> dict[str, str]:
    """What the recorded names depend on, as installed (importing only the top-level
    packages, which loading a model imports anyway)."""
    # start-up time: scikit-learn and SciPy only once a model is loaded
    import numpy
    import scipy
    import sklearn
    import skops

    return {
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "platform": f"{sys.platform}-{platform.machine()}",
        "skops": skops.__version__,
        "scikit-learn": sklearn.__version__,
        "scipy": scipy.__version__,
        "numpy": numpy.__version__,
    }


def import_skops_io() -> types.ModuleType:
    """``skops.io``, imported with the recorded default trusted types when they are
    those of the installed versions."""
    if "skops.io" not in sys.modules and TRUSTED_TYPES_MODULE not in sys.modules:
        stand_in = _recorded_module()
        if stand_in is not None:
            sys.modules[TRUSTED_TYPES_MODULE] = stand_in
    # not before the stand-in above is in place
    import skops.io

    return skops.io


def uses_recorded_names() -> bool:
    """Whether ``skops.io`` in this process reads the recorded names."""
    module = sys.modules.get(TRUSTED_TYPES_MODULE)
    return module is not None and bool(getattr(module, RECORDED, False))


def differences(module: types.ModuleType) -> list[str]:
    """How the recorded names differ from those in ``module`` (skops' own
    ``_trusted_types``, imported plainly); empty when they are the same."""
    # start-up time: 600 lines of names, read only as skops is loaded
    from digitstream.model import _skops_defaults_data as data

    problems = []
    for name in NAME_LISTS:
        recorded = list(data.NAMES.get(name, ()))
        actual = getattr(module, name, None)
        if actual != recorded:
            problems.append(f"{name}: recorded {recorded!r}, skops has {actual!r}")
    others = sorted(
        name
        for name, value in vars(module).items()
        if name.isupper() and name.endswith("_NAMES") and name not in NAME_LISTS
    )
    if others:
        problems.append(f"lists not recorded: {', '.join(others)}")
    return problems


def _recorded_module() -> types.ModuleType | None:
    # start-up time: 600 lines of names, read only as skops is loaded
    from digitstream.model import _skops_defaults_data as data

    if installed_versions() != data.VERSIONS:
        return None
    module = types.ModuleType(
        TRUSTED_TYPES_MODULE,
        "skops' default trusted type names, as recorded by digitstream.model.skops_defaults "
        f"for {data.VERSIONS}",
    )
    for name in NAME_LISTS:
        setattr(module, name, list(data.NAMES[name]))
    module.PRIMITIVES_TYPES = [int, float, str, bool]  # type: ignore[attr-defined]
    module.CONTAINER_TYPES = [list, set, map, tuple]  # type: ignore[attr-defined]
    setattr(module, RECORDED, True)
    return module


def render(versions: dict[str, str], names: dict[str, list[str]]) -> str:
    """The source of :mod:`digitstream.model._skops_defaults_data` for these names."""
    lines = [
        '"""skops\' default trusted type names for the versions in ``VERSIONS``.',
        "",
        "Written by ``python -m digitstream.model.skops_defaults``; do not edit.",
        '"""',
        "",
        "VERSIONS = {",
        *(f'    "{key}": "{value}",' for key, value in versions.items()),
        "}",
        "",
        "NAMES: dict[str, tuple[str, ...]] = {",
    ]
    for name in NAME_LISTS:
        lines.append(f'    "{name}": (')
        lines.extend(f'        "{item}",' for item in names[name])
        lines.append("    ),")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main() -> int:
    """Record the default trusted type names of the installed versions."""
    if uses_recorded_names() or "skops.io" in sys.modules:
        print("run this in a fresh interpreter", file=sys.stderr)
        return 1
    # imports every estimator: only here, in a fresh interpreter
    import skops.io._trusted_types as computed

    for name in NAME_LISTS:
        values = getattr(computed, name)
        if not all(isinstance(v, str) and '"' not in v and "\\" not in v for v in values):
            print(f"{name} holds a value that is not a plain name", file=sys.stderr)
            return 1
    names = {name: list(getattr(computed, name)) for name in NAME_LISTS}
    target = Path(__file__).with_name("_skops_defaults_data.py")
    target.write_text(render(installed_versions(), names), encoding="utf-8")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
