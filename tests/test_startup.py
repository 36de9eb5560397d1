"""Start-up of `digitstream run`: what its start path imports, and the measuring tool.

No timings are asserted here (they depend on the machine's load); the start path is
checked by what a fresh interpreter has imported.
"""

import json
import subprocess
import sys

import pytest

from digitstream.tools.startup import StartupError, measure_startup

HEAVY_UNUSED = ("matplotlib", "dask", "distributed", "redis", "pytest", "pandas", "jinja2")


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json\n"
                          "print(json.dumps(sorted(sys.modules)))"],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    return set(json.loads(out.splitlines()[-1]))


def _tops(modules: set[str]) -> set[str]:
    return {name.partition(".")[0] for name in modules}


def test_help_imports_nothing_heavy():
    modules = _modules_after("from digitstream.cli import main\n"
                             "try:\n    main(['--help'])\nexcept SystemExit:\n    pass")
    assert not _tops(modules) & {"numpy", "sklearn", "scipy", "skops", "aiohttp", *HEAVY_UNUSED}


def test_the_start_path_imports_neither_every_estimator_nor_unused_libraries(tmp_path):
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    from digitstream.model.bundle import save_bundle

    X, y = load_digits(return_X_y=True)
    save_bundle(LogisticRegression(max_iter=200).fit(X, y), tmp_path / "m", {})
    modules = _modules_after(
        "from digitstream.cli import _import_start_path\n"
        "_import_start_path(metrics=True)\n"
        "from digitstream.model.bundle import load_bundle\n"
        f"load_bundle({str(tmp_path / 'm')!r})")
    assert not _tops(modules) & set(HEAVY_UNUSED)
    assert "aiohttp.web" in modules  # the metrics UI is served before the listening line
    from digitstream.model import _skops_defaults_data as data
    from digitstream.model.skops_defaults import installed_versions
    if installed_versions() == data.VERSIONS:
        # skops' own default list would have imported every estimator's module
        assert "sklearn.ensemble" not in modules and "sklearn.gaussian_process" not in modules


def test_measure_startup_times_until_the_line():
    cmd = [sys.executable, "-c",
           "import sys, time; print('starting'); print('listening on 1.2.3.4:5, results to x',"
           " flush=True); time.sleep(60)"]
    result = measure_startup(cmd, 3)
    assert result["runs"] == 3 and len(result["seconds"]) == 3
    assert 0 < result["min"] <= result["median"] <= result["max"] < 60


def test_measure_startup_reports_a_command_that_exits_first():
    with pytest.raises(StartupError, match="exited with status 3"):
        measure_startup([sys.executable, "-c", "print('no'); raise SystemExit(3)"], 1)
    with pytest.raises(ValueError):
        measure_startup([sys.executable, "-c", "pass"], 0)


def test_a_linear_model_is_served_before_scikit_learn_is_imported(model_dir):
    """The seed's model is read from its stored arrays: nothing of scikit-learn, SciPy or
    skops is imported until ``run`` listens (they load afterwards, on a thread)."""
    modules = _modules_after(
        "from digitstream.cli import _import_start_path\n"
        "_import_start_path(metrics=True)\n"
        "from digitstream.app import AppConfig, Application\n"
        f"app = Application(AppConfig(model_path={str(model_dir)!r}, input_format='u8'))\n"
        "app.load()\n"
        "assert app.flow.runner.compiled\n")
    assert not _tops(modules) & {"sklearn", "scipy", "skops", *HEAVY_UNUSED}
    assert "numpy.ma" not in modules
