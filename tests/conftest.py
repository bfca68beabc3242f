import os

import pytest
import torch

import ppo_ext

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is a test extra; only the fuzz tests need it
    settings = None

# Hypothesis profiles: "ci" (the default) is derandomised and bounded so the suite fits CI's time;
# "slow" explores many more random examples. Select "slow" with --slow or PPO_EXT_HYPOTHESIS_PROFILE=slow.
if settings is not None:
    _health = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]
    settings.register_profile("ci", derandomize=True, max_examples=60, deadline=None, print_blob=True,
                              suppress_health_check=_health)
    settings.register_profile("slow", derandomize=False, max_examples=3000, deadline=None, print_blob=True,
                              suppress_health_check=_health)
    settings.load_profile(os.environ.get("PPO_EXT_HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False,
                     help="run the tests marked slow (e.g. > 2^31 elements) and the hypothesis 'slow' profile")


def pytest_configure(config):
    if config.getoption("--slow") and settings is not None and "PPO_EXT_HYPOTHESIS_PROFILE" not in os.environ:
        settings.load_profile("slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)


def _cuda_param():
    if not torch.cuda.is_available():
        return pytest.param("cuda", marks=pytest.mark.skip(reason="CUDA is not available on this machine"))
    if not ppo_ext.built_with_cuda():
        return pytest.param("cuda", marks=pytest.mark.skip(reason="ppo_ext was built without its CUDA kernels"))
    return "cuda"


DEVICES = ["cpu", _cuda_param()]


@pytest.fixture(params=DEVICES)
def device(request):
    """Every test taking `device` runs on the CPU and, where there is one, on the GPU."""
    return request.param
