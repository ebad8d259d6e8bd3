"""Test setup: 8 fake CPU devices so sharding is exercised, fp32 matmuls, no network; the tiny pipelines the
modules share (session-scoped: no test writes into them)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


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
