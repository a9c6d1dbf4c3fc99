"""Test configuration shared by every test module.

* Without a CUDA GPU, Triton kernels run through the interpreter: TRITON_INTERPRET=1 is exported
  before anything imports triton; a triton/numpy pair whose interpreter cannot run the kernels stops
  the run with the reason (``stop_kernels.backends.triton_interpreter_problem``).
* ``official_fixture`` loads a case computed by the official StoP / I-JEPA code from
  ``../shared/fixtures`` (or ``$STOP_KERNELS_FIXTURES``); the test is skipped, with that reason,
  only where the folder is absent.
* ``count_calls(module, name)`` counts the calls of a module function for one test.
* ``cpu_train``: the training tests' fast CPU setting (reference StoP path, one thread, the CPU even where a
  GPU is visible).
* ``@pytest.mark.needs("PIL", ...)``: the test is skipped, naming the module, where one of these optional
  packages (image files, torchvision transforms, safetensors exports) is not installed: a bare torch +
  triton environment (such as a GPU image's) runs every other test instead of erroring on these.
  With ``STOP_KERNELS_REQUIRE_OPTIONAL=1`` (set by ``.ci/run``, which installs them) a missing one fails the test.
  A module that imports one (hypothesis) calls ``skip_unless_installed(..., module_level=True)`` at its top.
* The hypothesis profile of the property tests (``tests/test_properties_*.py``): fixed examples, no deadline.
"""
import importlib.util
import os
import pathlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from stop_kernels.backends import triton_interpreter_problem, triton_interpreting  # noqa: E402


def pytest_configure(config):
    """Stop at once, saying why, where the Triton interpreter cannot run (instead of every kernel test
    failing with a TypeError from inside triton)."""
    if triton_interpreting() and triton_interpreter_problem():
        pytest.exit("tests need the Triton CPU interpreter, but " + triton_interpreter_problem(), returncode=4)
    config.addinivalue_line("markers", "needs(*modules): skip unless these optional modules are importable")


def skip_unless_installed(*modules, module_level: bool = False) -> None:
    """Skip (naming them) unless these optional modules are importable; with ``STOP_KERNELS_REQUIRE_OPTIONAL=1``
    fail instead: CI installs the dev extras, and a skip there would hide the check, not report a broken install.
    ``module_level``: called at a test module's top (a module that imports the package itself, e.g. hypothesis)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing and os.environ.get("STOP_KERNELS_REQUIRE_OPTIONAL") == "1":
        pytest.fail(f"needs {', '.join(missing)}, not installed, and STOP_KERNELS_REQUIRE_OPTIONAL=1", pytrace=False)
    if missing:
        pytest.skip(f"needs {', '.join(missing)}, not installed (optional)", allow_module_level=module_level)


def pytest_runtest_setup(item):
    """Skip a ``needs``-marked test before its fixtures run (a module-scoped fixture may write the images)."""
    for mark in item.iter_markers("needs"):
        skip_unless_installed(*mark.args)


# The property tests (tests/test_properties_*.py, hypothesis): the same examples on every run and no example
# database, so CI is reproducible; no deadline, since an example runs kernels in the Triton interpreter (0.05–3 s,
# with the shape and the machine's load); a test's first example pays torch's warm-up (too_slow), and the autouse
# fixtures hold for every example of a test (function_scoped_fixture). `STOP_KERNELS_HYPOTHESIS=explore` draws
# fresh examples on each run instead, to look for failures beyond the fixed ones.
if importlib.util.find_spec("hypothesis") is not None:
    from hypothesis import HealthCheck, settings

    settings.register_profile("stop_kernels", deadline=None, derandomize=True, database=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    settings.register_profile("explore", settings.get_profile("stop_kernels"), derandomize=False)
    settings.load_profile(os.environ.get("STOP_KERNELS_HYPOTHESIS", "stop_kernels"))


REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = pathlib.Path(os.environ.get("STOP_KERNELS_FIXTURES", REPO.parent / "shared" / "fixtures"))


@pytest.fixture
def official_fixture():
    def load(name: str):
        path = FIXTURES / name
        if not FIXTURES.is_dir():
            pytest.skip(f"official fixtures folder {FIXTURES} is absent (set STOP_KERNELS_FIXTURES)")
        if not path.is_file():
            pytest.fail(f"fixtures folder {FIXTURES} exists but {name} is missing")
        return torch.load(path, weights_only=True)
    return load


@pytest.fixture
def count_calls(monkeypatch):
    """``count_calls(module, name)`` replaces ``module.name`` with a wrapper that calls the original
    and records one entry per call; returns that (live) list. Undone with the test's monkeypatch."""
    def install(module, name: str) -> list:
        calls, real = [], getattr(module, name)

        def counted(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
        return calls
    return install


@pytest.fixture
def cpu_train(monkeypatch):
    """Reference (non-interpreted) predictor-input path and one thread: fast, deterministic CPU training,
    also on a machine with a GPU (``device: auto`` and ``precision: auto`` resolve to the CPU and fp32, which
    these tests' tolerances, bitwise resumes and expected refusals assume; the GPU paths have tests of their own)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
