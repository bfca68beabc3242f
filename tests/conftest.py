import pytest
import torch

import ppo_ext


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
