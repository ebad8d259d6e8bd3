"""Test setup: 8 fake CPU devices so sharding is exercised, fp32 matmuls, no network; what several modules share
(session-scoped: no test writes into them): the tiny pipelines, the brightness D3PO run, a headless browser and
the XLA compilation cache."""

import os
import shutil

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# As the ``dpojax`` command runs itself (dpojax.host): its subprocesses then start without re-executing.
os.environ.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Modules holding the suite's longest runs: scheduled first, so that pytest-xdist's workers end together.
LONGEST_FIRST = ("test_multihost", "test_train_loop", "test_d3po_rounds", "test_plan", "test_bench")


def pytest_collection_modifyitems(config, items):
    """Work units for pytest-xdist (``launch/test.sh``: one worker per core, ``--dist loadgroup``): a module's
    tests stay on one worker so that its module-scoped fixtures are made once, except where the module sets
    ``XDIST_SPLIT`` (each test makes its own runs); modules using the session's D3PO run go together."""
    shared = {item.module.__name__ for item in items if "d3po_brightness_run" in item.fixturenames}

    def group(item) -> str:
        module = item.module.__name__
        if getattr(item.module, "XDIST_SPLIT", False):
            return f"{module}.{item.name}"
        return "d3po_brightness_run" if module in shared else module

    def rank(item) -> int:
        module = item.module.__name__
        return LONGEST_FIRST.index(module) if module in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the collection order within each rank
    for item in items:
        item.add_marker(pytest.mark.xdist_group(group(item)))


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent XLA compilation cache for the session, in this process and in every ``dpojax`` subprocess
    (``helpers.cli_env``): many tests build the same tiny programs, which then compile once."""
    basetemp = tmp_path_factory.getbasetemp()
    folder = (basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp) / "jax_cache"
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(folder)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """A tiny random SDXL pipeline in diffusers layout (seed 0), read-only."""
    from dpojax.tiny import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-sdxl", arch="sdxl", seed=0)


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory):
    """A tiny random SD1.5 pipeline in diffusers layout (seed 1), read-only."""
    from dpojax.tiny import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-sd15", arch="sd15", seed=1)


@pytest.fixture(scope="session")
def d3po_brightness_run(tmp_path_factory, tiny_sdxl):
    """``dpojax train configs/tiny_d3po_brightness.yaml`` on the tiny SDXL pipeline, as the demo trains it:
    (its run folder, the finished process)."""
    from helpers import D3PO_CONFIG, run_dpojax

    root = tmp_path_factory.mktemp("d3po_brightness")
    (root / "tiny-sdxl").symlink_to(tiny_sdxl)
    run = root / "run"
    done = run_dpojax(root, "train", D3PO_CONFIG, f"model.pretrained={root / 'tiny-sdxl'}", f"train.output_dir={run}",
                      "logging.tensorboard=false")
    return run, done


@pytest.fixture(scope="session")
def browser():
    """Headless Debian chromium driven by selenium; in CI it must be there (.ci/run installs it)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        webdriver = None
    if not (chromium and driver_path and webdriver):
        missing = "selenium" if chromium and driver_path else "chromium/chromedriver"
        pytest.fail(f"{missing} is missing: the browser test needs it (apt-get install chromium chromium-driver; "
                    f"pip install -e '.[test]'; .ci/run does both)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()
