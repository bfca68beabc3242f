"""Build of ppo_ext's C++/CUDA library against the torch that is installed.

    pip install --no-build-isolation .

Builds the CUDA kernels when torch is a CUDA build and a CUDA toolkit is found (with no GPU visible,
TORCH_CUDA_ARCH_LIST must name the architectures), else the CPU kernels alone, and says which.
PPO_EXT_BUILD_CUDA=1 forces the CUDA build (and fails if it cannot be done), PPO_EXT_BUILD_CUDA=0
forces the CPU-only build.
"""

import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    sys.exit(
        "ppo_ext compiles against the torch you train with, so torch must be installed first and the build "
        "must see it:\n    pip install torch\n    pip install --no-build-isolation .\n"
        "(a plain `pip install .` builds in an isolated environment without torch.)"
    )

HERE = os.path.dirname(os.path.abspath(__file__))
INCLUDE = os.path.join(HERE, "include")  # the C++ API header, include/ppo_ext/ppo_ext.h


def _cuda_build_reason():
    """None if the CUDA kernels can be built here, else why not."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if cpp_extension.CUDA_HOME is None or not os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")):
        return "no CUDA toolkit found (set CUDA_HOME)"
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return "no GPU is visible and TORCH_CUDA_ARCH_LIST is not set"
    return None


def _want_cuda():
    forced = os.environ.get("PPO_EXT_BUILD_CUDA", "").strip()
    reason = _cuda_build_reason()
    if forced == "0":
        print("ppo_ext: building the CPU kernels only (PPO_EXT_BUILD_CUDA=0)")
        return False
    if forced == "1" and reason is not None:
        sys.exit(f"ppo_ext: PPO_EXT_BUILD_CUDA=1 but the CUDA kernels cannot be built: {reason}")
    if reason is None:
        print(f"ppo_ext: building the CPU and CUDA kernels (CUDA {torch.version.cuda}, "
              f"CUDA_HOME={cpp_extension.CUDA_HOME}, arch {os.environ.get('TORCH_CUDA_ARCH_LIST', 'of the visible GPU')})")
        return True
    print(f"ppo_ext: building the CPU kernels only: {reason}")
    return False


def _extension():
    with_cuda = _want_cuda()
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx_flags = ["-O3", "-fopenmp", "-fdiagnostics-color=always"]  # at::parallel_for is OpenMP, as in torch
    if not with_cuda:
        return cpp_extension.CppExtension(
            "ppo_ext._C", sources, include_dirs=[INCLUDE], extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"], py_limited_api=True,
        )
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    return cpp_extension.CUDAExtension(
        "ppo_ext._C",
        sources,
        include_dirs=[INCLUDE],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
