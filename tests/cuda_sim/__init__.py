"""Builds and loads the CUDA simulator module (sim_ops.cpp + cuda_sim.cpp + csrc/checks.cpp): ppo_ext's CUDA
host code and kernels compiled by the host C++ compiler and run on the CPU (see cuda_sim.h).

    from cuda_sim import load
    sim = load()                     # built once per torch version and flags, then cached (~1-2 min to build)
    sim.set_schedule("random", 7)
    loss, metrics, counts, token_grad, grad_scale = sim.policy_loss(...)   # the op's positional arguments

Environment: PPO_EXT_SIM_BUILD_DIR (default build/cuda_sim-<torch version> in the checkout),
PPO_EXT_SANITIZER=1 (scripts/sanitize.sh: built with AddressSanitizer + UBSan in its own directory) and
PPO_EXT_SIM_CSRC (another csrc/ to build from: scripts/cuda_mutations.py builds mutated copies) and
PPO_EXT_SIM_PREBUILT=1 (import the module already built in the build directory without running the build:
scripts/sanitize.sh builds first, then runs the tests with AddressSanitizer preloaded, where no compiler
should run).
"""

import importlib.util
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.environ.get("PPO_EXT_SIM_CSRC") or os.path.join(ROOT, "csrc")
SOURCES = [os.path.join(HERE, "sim_ops.cpp"), os.path.join(HERE, "cuda_sim.cpp"), os.path.join(CSRC, "checks.cpp")]

_module = None


def _flags():
    sanitize = os.environ.get("PPO_EXT_SANITIZER") == "1"
    flags = ["-O2", "-g0", "-std=c++20", "-fno-strict-aliasing"]
    if sanitize:
        flags = ["-O1", "-g", "-std=c++20", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                 "-fno-omit-frame-pointer"]
    return flags, sanitize


def load(verbose=False):
    """The simulator module, built if needed (torch.utils.cpp_extension.load, cached by source and flags)."""
    global _module
    if _module is not None:
        return _module
    from torch.utils import cpp_extension

    flags, sanitize = _flags()
    tag = torch.__version__.replace("+", "_") + ("-asan" if sanitize else "")
    build_dir = os.environ.get("PPO_EXT_SIM_BUILD_DIR") or os.path.join(ROOT, "build", f"cuda_sim-{tag}")
    name = "ppo_ext_cuda_sim" + ("_asan" if sanitize else "")
    if os.environ.get("PPO_EXT_SIM_PREBUILT") == "1":
        path = os.path.join(build_dir, name + ".so")
        if not os.path.exists(path):
            raise RuntimeError(f"PPO_EXT_SIM_PREBUILT=1 but {path} has not been built")
        spec = importlib.util.spec_from_file_location(name, path)
        _module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_module)
        return _module
    os.makedirs(build_dir, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", "2")
    _module = cpp_extension.load(
        name=name,
        sources=SOURCES,
        extra_include_paths=[CSRC, os.path.join(ROOT, "include")],
        extra_cflags=flags,
        extra_ldflags=flags if sanitize else [],
        build_directory=build_dir,
        verbose=verbose,
    )
    return _module
