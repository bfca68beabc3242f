"""The frameworks' code the benchmarks measure ppo_ext against.

- verl's and OpenRLHF's losses are their released code, loaded from the installed packages (``pip install
  --no-deps verl==0.9.1 openrlhf==0.11.2``, which scripts/setup_env.sh does) by tests/frameworks.py, the one
  loader, shared with the adapter tests: ``frameworks()`` returns that module (``frameworks().verl()``,
  ``frameworks().openrlhf()``; ``frameworks().FrameworkMissing`` when a package is absent).
- ``trl.py``: TRL's ``selective_log_softmax``.
"""

import importlib.util
import os
import sys

_FRAMEWORKS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tests",
                           "frameworks.py")


def frameworks():
    """tests/frameworks.py, imported from its path (``tests`` is no package, and another ``tests`` may be
    installed), once: under the name ``frameworks``, which the tests import it by."""
    module = sys.modules.get("frameworks")
    if module is None:
        spec = importlib.util.spec_from_file_location("frameworks", _FRAMEWORKS)
        module = importlib.util.module_from_spec(spec)
        sys.modules["frameworks"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules["frameworks"]
            raise
    return module
