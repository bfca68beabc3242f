"""The frameworks' own code, loaded from their installed packages without their heavy dependencies.

The adapter tests (tests/test_compat_verl.py, tests/test_compat_openrlhf.py) and the benchmarks
(benchmarks/bench_policy_loss.py, benchmarks/bench_logits.py) compare ppo_ext with the loss functions
the frameworks release, not with our reading of them: the framework's package is installed without its
dependencies (``pip install --no-deps verl==0.9.1 openrlhf==0.11.2 trl==1.16.0``, which
scripts/setup_env.sh does), and the module that holds the loss is executed from the installed file
with stand-ins for the imports the loss code does not use (ray, deepspeed, vllm, transformers, ...).
Nothing of a framework is copied into this repository.

API (general: nothing in it is specific to one framework)
----------------------------------------------------------

``require(distribution, version=None) -> str``
    The installed version of ``distribution``. Raises ``FrameworkMissing`` (an ImportError) with a
    reason that says what to install when it is not installed, or installed in another version than
    ``version`` (the adapters are written against one release).

``package_dir(package) -> pathlib.Path``
    The folder of the installed top-level ``package``, found with ``importlib.util.find_spec``
    without importing it (its ``__init__`` often imports everything).

``stub_class(qualname)``, ``stub_function(qualname)``
    Stand-ins for names the loaded code imports but does not use. A stub class is an empty class:
    it can be instantiated (dataclass default factories call it), named in annotations (``A | B``)
    and in ``isinstance``, and has no attributes. A stub function raises ``StubUsed`` when called, so
    that code which does use it fails loudly instead of computing with a stand-in.

``stubbed_imports(hollow=(), stubs=None)`` (a context manager)
    While it is open, ``sys.modules`` holds

    - ``hollow``: packages (names, or a mapping name -> extra attributes) whose ``__init__`` is *not*
      executed: a module with the installed package's ``__path__``, so that its submodules are
      imported from their real files, one by one, while the package's own imports are skipped;
    - ``stubs``: a mapping of module name -> a dict of attributes (a stand-in module holding just
      those, e.g. ``{"deepspeed": {}}`` or ``{"omegaconf": {"DictConfig": stub_class("DictConfig")}}``)
      or ``None``, which makes importing it fail with ImportError (optional dependencies that the code
      tries in ``try: ... except ImportError``).

    Every parent of a dotted name must itself be hollow, stubbed or already imported. On exit
    ``sys.modules`` is put back for every name under the top-level packages involved (the loaded
    modules stay usable: their functions keep their globals); modules imported on the way that belong
    to other packages (numpy, torch submodules) stay imported. It yields the dict of the modules it
    put in place, by name.

``load_module(name, hollow=(), stubs=None) -> module``
    ``importlib.import_module(name)`` inside ``stubbed_imports``: the installed module, executed from
    its file (``module.__file__``).

``load_functions(module_name, names, namespace) -> dict``
    For when even stubbed imports pull in too much: the top-level definitions ``names`` (functions,
    classes, assignments) of the installed source file of ``module_name``, compiled from that file
    (tracebacks point into it) and executed in ``namespace``, which must supply the globals they use.
    Returns ``{name: object}``.

``load_or_skip(loader, *args)``
    ``loader(*args)``, or ``pytest.skip`` with the loader's reason when the framework is missing,
    so that a test never passes silently without the framework. With ``PPO_EXT_REQUIRE_FRAMEWORKS=1``
    in the environment a missing framework fails the test instead (for CI, where setup_env.sh has
    installed them).

Recipes (what this repository's tests and benchmarks load; each is loaded once per process)
-----------------------------------------------------------------------------------------

``verl()`` -> namespace with ``core_algos`` (verl/trainer/ppo/core_algos.py: ``agg_loss``,
``compute_policy_loss_vanilla``, ``compute_policy_loss_gspo``, ...), ``torch_functional``
(verl/utils/torch_functional.py: ``masked_mean``, ``masked_sum``), ``ActorConfig`` (verl's own
dataclass, verl/workers/config/actor.py), ``actor_config(**fields)`` (an ActorConfig with the fields
verl's ``__post_init__`` insists on filled in) and ``version``.

``verl_actor()`` -> namespace with verl's actor loss ``ppo_loss`` (verl/workers/utils/losses.py) and what it runs on:
``tu`` (tensordict_utils), ``Metric``, ``AggregationType``, ``TensorDict`` (the real tensordict) and ``modules``.

``trl()`` -> namespace with ``GRPOTrainer`` (trl/trainer/grpo_trainer.py's class: ``_compute_loss``,
``get_gamma_weights``, ...), ``GRPOConfig``, ``module`` (grpo_trainer) and ``version``.

``openrlhf()`` -> namespace with ``loss`` (the module openrlhf.models.loss: ``PolicyLoss``,
``aggregate_loss``), ``utils`` (openrlhf.models.utils: ``masked_mean``) and ``version``.

``liger_grpo()`` -> namespace with ``LigerFusedLinearGRPOLoss`` (Liger-Kernel's liger_kernel/chunked_loss: ATen
matmuls and torch ops, no Triton, so it runs on the CPU) and ``version``.
"""

import ast
import contextlib
import functools
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import logging
import os
import re
import sys
import types
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Union

__all__ = ["FrameworkMissing", "StubUsed", "require", "package_dir", "stub_class", "stub_function",
           "stubbed_imports", "load_module", "load_functions", "load_or_skip", "verl", "verl_actor", "openrlhf",
           "trl", "liger_grpo", "VERL_VERSION", "OPENRLHF_VERSION", "TRL_VERSION", "LIGER_VERSION"]

VERL_VERSION = "0.9.1"
OPENRLHF_VERSION = "0.11.2"
TRL_VERSION = "1.16.0"
LIGER_VERSION = "0.8.5"
REQUIRE_ENV = "PPO_EXT_REQUIRE_FRAMEWORKS"


class FrameworkMissing(ImportError):
    """The framework (in the version asked for) is not installed: the reason says what to install."""


class StubUsed(AssertionError):
    """Code loaded with stubs called one of them: the stub stood in for something it does use."""


# ----------------------------------------------------------------------------------------------------
# Finding the installed package


def require(distribution: str, version: Optional[str] = None) -> str:
    try:
        installed = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    wanted = f"{distribution}=={version}" if version else distribution
    if installed is None:
        raise FrameworkMissing(
            f"{distribution} is not installed in this environment ({sys.executable}); the test compares with "
            f"its released code: pip install --no-deps {wanted} (scripts/setup_env.sh does)")
    if version is not None and installed != version:
        raise FrameworkMissing(
            f"{distribution} {installed} is installed, but the adapter is written against {version}: "
            f"pip install --no-deps {wanted}")
    return installed


def package_dir(package: str) -> Path:
    if "." in package:
        raise ValueError(f"package_dir takes a top-level package, got {package!r}")
    spec = importlib.util.find_spec(package)  # a top-level name: found, not imported
    if spec is None or not spec.submodule_search_locations:
        raise FrameworkMissing(f"no installed package {package!r} on sys.path")
    return Path(list(spec.submodule_search_locations)[0])


# ----------------------------------------------------------------------------------------------------
# Stand-ins


def stub_class(qualname: str) -> type:
    name = qualname.rpartition(".")[2]
    return type(name, (), {"__doc__": f"Stand-in for {qualname} (tests/frameworks.py): not used by the loaded "
                                      f"code.", "__module__": "frameworks.stubs", "__qualname__": name})


def stub_function(qualname: str):
    def stub(*args, **kwargs):
        raise StubUsed(f"{qualname} is a stand-in (tests/frameworks.py); the code under test called it, so it "
                       f"uses it after all: load the real one instead of stubbing it")

    stub.__name__ = stub.__qualname__ = qualname.rpartition(".")[2]
    return stub


def _hollow_package(name: str, attrs: Mapping[str, Any]) -> types.ModuleType:
    """The package `name` with its installed __path__, its __init__ not executed."""
    top, _, rest = name.partition(".")
    path = package_dir(top).joinpath(*rest.split(".")) if rest else package_dir(top)
    if not (path / "__init__.py").is_file():
        raise FrameworkMissing(f"{name} is not an installed package (no {path / '__init__.py'})")
    module = types.ModuleType(name, f"{name}, its __init__ not executed (tests/frameworks.py)")
    module.__path__ = [str(path)]
    module.__package__ = name
    module.__file__ = str(path / "__init__.py")
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, origin=module.__file__, is_package=True)
    module.__spec__.submodule_search_locations = [str(path)]
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


def _stub_module(name: str, attrs: Mapping[str, Any]) -> types.ModuleType:
    module = types.ModuleType(name, f"Stand-in for {name} (tests/frameworks.py)")
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


# ----------------------------------------------------------------------------------------------------
# Loading


def _under(name: str, tops) -> bool:
    return name.partition(".")[0] in tops


@contextlib.contextmanager
def stubbed_imports(hollow: Union[Iterable[str], Mapping[str, Mapping[str, Any]]] = (),
                    stubs: Optional[Mapping[str, Optional[Mapping[str, Any]]]] = None):
    hollow = dict(hollow) if isinstance(hollow, Mapping) else {h: {} for h in hollow}
    stubs = dict(stubs or {})
    both = sorted(set(hollow) & set(stubs))
    if both:
        raise ValueError(f"{both} are both hollow and stubbed")
    placed: Dict[str, Optional[types.ModuleType]] = {}
    for name in sorted(hollow, key=lambda n: n.count(".")):
        placed[name] = _hollow_package(name, hollow[name])
    for name in sorted(stubs, key=lambda n: n.count(".")):
        placed[name] = None if stubs[name] is None else _stub_module(name, stubs[name])
    for name in placed:
        parent = name.rpartition(".")[0]
        while parent:
            if parent not in placed and parent not in sys.modules:
                raise ValueError(f"{name}'s parent package {parent} is neither hollow, stubbed nor imported: "
                                 f"importing {name} would execute {parent}'s __init__")
            parent = parent.rpartition(".")[0]
    for name, module in placed.items():  # `from a import b` and `import a.b as c` find b on a
        parent, _, child = name.rpartition(".")
        if module is not None and placed.get(parent) is not None:
            setattr(placed[parent], child, module)

    tops = {n.partition(".")[0] for n in placed}
    before = dict(sys.modules)
    sys.modules.update(placed)
    try:
        yield {n: m for n, m in placed.items() if m is not None}
    finally:
        for name in list(sys.modules):
            if _under(name, tops) and (name not in before or sys.modules[name] is not before[name]):
                del sys.modules[name]
        for name, module in before.items():
            if _under(name, tops):
                sys.modules[name] = module


def load_module(name: str, hollow=(), stubs=None) -> types.ModuleType:
    with stubbed_imports(hollow, stubs):
        return importlib.import_module(name)


def _module_file(module_name: str) -> Path:
    top, _, rest = module_name.partition(".")
    base = package_dir(top)
    parts = rest.split(".") if rest else []
    candidate = base.joinpath(*parts).with_suffix(".py") if parts else base / "__init__.py"
    if not candidate.is_file():
        candidate = base.joinpath(*parts, "__init__.py")
    if not candidate.is_file():
        raise FrameworkMissing(f"no source file for {module_name} under {base}")
    return candidate


def load_functions(module_name: str, names: Iterable[str], namespace: Dict[str, Any]) -> Dict[str, Any]:
    path = _module_file(module_name)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    wanted = list(names)
    chosen, found = [], set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined = {node.name}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            defined = {t.id for t in targets if isinstance(t, ast.Name)}
        else:
            continue
        if defined & set(wanted):
            chosen.append(node)
            found |= defined
    missing = [n for n in wanted if n not in found]
    if missing:
        raise FrameworkMissing(f"{path} defines no top-level {missing}")
    namespace.setdefault("__name__", module_name)
    namespace.setdefault("__file__", str(path))
    exec(compile(ast.Module(body=chosen, type_ignores=[]), str(path), "exec"), namespace)
    return {n: namespace[n] for n in wanted}


def load_or_skip(loader, *args):
    try:
        return loader(*args)
    except FrameworkMissing as exc:
        import pytest

        if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
            pytest.fail(f"{exc} ({REQUIRE_ENV} is set: the framework tests must run)", pytrace=False)
        pytest.skip(str(exc))


# ----------------------------------------------------------------------------------------------------
# Recipes


@functools.lru_cache(maxsize=None)
def verl() -> types.SimpleNamespace:
    """verl 0.9.1's core_algos, torch_functional and ActorConfig, from the installed package.

    Real: verl/trainer/ppo/core_algos.py, verl/utils/torch_functional.py, verl/utils/import_utils.py,
    verl/trainer/ppo/rollout_corr_helper.py (bypass_mode's weights, masks and metrics),
    verl/base_config.py, verl/trainer/config (AlgoConfig, CheckpointConfig, RolloutCorrectionConfig),
    verl/workers/config/actor.py (ActorConfig), checkpoint.py and optimizer.py beside it, and
    verl/utils/profiler/config.py. Hollow (``__init__`` skipped): verl (imports ray), verl.utils
    (tokenizers), verl.utils.profiler, verl.workers, verl.workers.config (every worker config). Stubbed:
    omegaconf (``DictConfig`` only names a type, ``MISSING`` is omegaconf's "???"), tensordict,
    transformers, verl.protocol (``_DataProto``: the helper only wraps a tensor in it), verl.utils.device,
    verl.utils.qat, the engine and model configs (default factories
    of ActorConfig fields), and verl.utils' ``as_torch_index`` / ``group_mean_std`` (advantage
    estimators); flash_attn and torch_npu are made unimportable (verl tries them and falls back).
    """
    version = require("verl", VERL_VERSION)
    hollow = {
        "verl": {},
        "verl.utils": {"as_torch_index": stub_function("verl.utils.as_torch_index"),
                       "group_mean_std": stub_function("verl.utils.group_mean_std")},
        "verl.utils.profiler": {},
        "verl.workers": {},
        "verl.workers.config": {},
    }
    stubs = {
        "omegaconf": {"DictConfig": stub_class("omegaconf.DictConfig"), "MISSING": "???"},
        "tensordict": {"TensorDict": stub_class("tensordict.TensorDict")},
        "transformers": {"PreTrainedTokenizer": stub_class("transformers.PreTrainedTokenizer")},
        "verl.utils.device": {"get_device_name": stub_function("verl.utils.device.get_device_name"),
                              "get_torch_device": stub_function("verl.utils.device.get_torch_device")},
        "verl.utils.qat": {"QATConfig": stub_class("verl.utils.qat.QATConfig")},
        "verl.workers.config.engine": {n: stub_class(f"verl.workers.config.engine.{n}") for n in (
            "FSDPEngineConfig", "McoreEngineConfig", "TorchtitanEngineConfig", "VeOmniEngineConfig")},
        "verl.workers.config.model": {"HFModelConfig": stub_class("verl.workers.config.model.HFModelConfig")},
        "verl.protocol": {"DataProto": _DataProto},
        "flash_attn": None,
        "torch_npu": None,
    }
    with stubbed_imports(hollow, stubs) as placed:
        actor = importlib.import_module("verl.workers.config.actor")
        placed["verl.workers.config"].ActorConfig = actor.ActorConfig  # what core_algos imports from there
        core_algos = importlib.import_module("verl.trainer.ppo.core_algos")
        torch_functional = importlib.import_module("verl.utils.torch_functional")
        rollout_corr_helper = importlib.import_module("verl.trainer.ppo.rollout_corr_helper")

    def actor_config(**fields):
        """verl's ActorConfig: ``fields`` plus the ones its __post_init__ requires (strategy, rollout_n,
        a micro-batch size), which the loss functions do not read."""
        fields.setdefault("strategy", "fsdp")
        fields.setdefault("rollout_n", 1)
        fields.setdefault("ppo_micro_batch_size_per_gpu", 1)
        return actor.ActorConfig(**fields)

    return types.SimpleNamespace(core_algos=core_algos, torch_functional=torch_functional,
                                 rollout_corr_helper=rollout_corr_helper, ActorConfig=actor.ActorConfig,
                                 actor_config=actor_config, version=version)


class _DataProto:
    """verl.protocol.DataProto as rollout_corr_helper uses it: ``DataProto.from_dict(tensors=...)``, read back as
    ``.batch[key]`` (the real one imports ray)."""

    def __init__(self, batch):
        self.batch = batch

    @classmethod
    def from_dict(cls, tensors):
        return cls(dict(tensors))


@functools.lru_cache(maxsize=None)
def verl_actor() -> types.SimpleNamespace:
    """verl 0.9.1's actor loss, ``ppo_loss`` (verl/workers/utils/losses.py), with what it runs on.

    Real: verl/workers/utils/losses.py and padding.py, verl/utils/tensordict_utils.py, attention_utils.py,
    verl/utils/metric (Metric, AggregationType), verl/utils/dataset/dataset_utils.py, and tensordict itself
    (installed with ``--no-deps``, pinned in scripts/frameworks.txt with its pure-Python dependencies pyvers and
    cloudpickle); core_algos, torch_functional and ActorConfig are verl()'s. Hollow: verl, verl.utils,
    verl.utils.dataset, verl.workers, verl.workers.utils, verl.trainer, verl.trainer.ppo. Stubbed:
    verl.workers.config's CriticConfig. Returns ``ppo_loss``, ``tu`` (tensordict_utils), ``Metric``,
    ``AggregationType``, ``TensorDict`` and ``modules`` = (padding, metric, losses): the modules
    ppo_ext.compat.verl's actor loss imports from an installed verl.
    """
    base = verl()
    require("tensordict")
    hollow = ("verl", "verl.utils", "verl.utils.dataset", "verl.workers", "verl.workers.utils", "verl.trainer",
              "verl.trainer.ppo")
    stubs = {
        "verl.trainer.ppo.core_algos": vars(base.core_algos),
        "verl.utils.torch_functional": vars(base.torch_functional),
        "verl.workers.config": {"ActorConfig": base.ActorConfig,
                                "CriticConfig": stub_class("verl.workers.config.CriticConfig")},
    }
    with stubbed_imports(hollow, stubs):
        losses = importlib.import_module("verl.workers.utils.losses")
        padding = importlib.import_module("verl.workers.utils.padding")
        metric = importlib.import_module("verl.utils.metric")
        tu = importlib.import_module("verl.utils.tensordict_utils")
    from tensordict import TensorDict
    return types.SimpleNamespace(ppo_loss=losses.ppo_loss, tu=tu, Metric=metric.Metric,
                                 AggregationType=metric.AggregationType, TensorDict=TensorDict,
                                 modules=(padding, metric, losses), version=base.version)


@functools.lru_cache(maxsize=None)
def openrlhf() -> types.SimpleNamespace:
    """OpenRLHF 0.11.2's openrlhf.models.loss (PolicyLoss, aggregate_loss) and openrlhf.models.utils
    (masked_mean), from the installed package. Hollow: openrlhf.models (its __init__ imports the actor:
    transformers, flash_attn, peft). Stubbed: deepspeed (imported by openrlhf.models.utils, used only by
    set_z3_leaf_modules)."""
    version = require("openrlhf", OPENRLHF_VERSION)
    with stubbed_imports(hollow={"openrlhf": {}, "openrlhf.models": {}},
                         stubs={"deepspeed": {"utils": stub_function("deepspeed.utils")}}):
        utils = importlib.import_module("openrlhf.models.utils")
        loss = importlib.import_module("openrlhf.models.loss")
    return types.SimpleNamespace(loss=loss, utils=utils, version=version)


def _top_level_imports(module_name):
    """{module: [names]} of the top-level import statements of an installed module's file."""
    top, _, rest = module_name.partition(".")
    path = package_dir(top).joinpath(*rest.split(".")).with_suffix(".py")
    package = module_name.rpartition(".")[0]
    found = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            module = node.module if not node.level else (f"{base}.{node.module}" if node.module else base)
            found.setdefault(module, []).extend(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                found.setdefault(alias.name, [])
    return found


def _stand_in(module, name):
    qualname = f"{module}.{name}"
    if name.lstrip("_")[:1].isupper():
        return stub_class(qualname)
    return stub_function(qualname)


@functools.lru_cache(maxsize=None)
def trl() -> types.SimpleNamespace:
    """TRL 1.16.0's trl/trainer/grpo_trainer.py (GRPOTrainer) and grpo_config.py (GRPOConfig), from the installed
    package. Hollow: trl, trl.trainer (their __init__ import transformers). Every name grpo_trainer.py imports from a
    package that is not installed here (transformers, accelerate, datasets, huggingface_hub, pandas) or from TRL's
    other modules is a stand-in (read off its import statements), except what the import or the loss path calls:
    is_peft_available, is_rich_available, is_trackio_available, is_wandb_available (False), get_logger
    (logging.getLogger), profiling_decorator (the identity), nanmin / nanmax (TRL's own, from
    trl/trainer/utils.py) and GRPOConfig (TRL's dataclass on a stand-in TrainingArguments)."""
    version = require("trl", TRL_VERSION)
    hollow = ("trl", "trl.trainer")
    training_arguments = type("TrainingArguments", (), {"_VALID_DICT_FIELDS": [], "__doc__": "Stand-in."})
    with stubbed_imports(hollow, {"transformers": {"TrainingArguments": training_arguments}}):
        grpo_config = importlib.import_module("trl.trainer.grpo_config")

    real = ("torch", "numpy", "packaging")
    stubs = {}
    for module, names in _top_level_imports("trl.trainer.grpo_trainer").items():
        top = module.partition(".")[0]
        if top in sys.stdlib_module_names or top in real:
            continue
        stubs[module] = {name: _stand_in(module, name) for name in names}
        parent = module.rpartition(".")[0]
        while parent and parent not in hollow:
            stubs.setdefault(parent, {})
            parent = parent.rpartition(".")[0]
    never = lambda *args, **kwargs: False  # noqa: E731
    stubs["transformers"].update(is_trackio_available=never, is_wandb_available=never)
    stubs["transformers.utils"].update(is_peft_available=never, is_rich_available=never)
    stubs["accelerate.logging"]["get_logger"] = logging.getLogger
    stubs["trl.extras.profiling"]["profiling_decorator"] = lambda function: function
    torch = importlib.import_module("torch")
    stubs["trl.trainer.utils"].update(load_functions("trl.trainer.utils", ["nanmin", "nanmax"], {"torch": torch}))
    stubs["trl.trainer.grpo_config"]["GRPOConfig"] = grpo_config.GRPOConfig
    with stubbed_imports(hollow, stubs):
        grpo_trainer = importlib.import_module("trl.trainer.grpo_trainer")
    return types.SimpleNamespace(GRPOTrainer=grpo_trainer.GRPOTrainer, GRPOConfig=grpo_config.GRPOConfig,
                                 module=grpo_trainer, version=version)


@functools.lru_cache(maxsize=None)
def trl_chunked_logprob() -> types.SimpleNamespace:
    """TRL 1.16.0's chunked LM-head log-probs, trl/kernels/chunked_logprob.py (``ChunkedLogProbFunction``: cuBLAS
    tiles of 4096 tokens x ``chunk_size`` vocabulary entries, Triton kernels on a GPU, torch ops elsewhere, gradients
    accumulated in float32), and the chunk size TRL's trainer passes (``_CHUNKED_LOGPROB_CHUNK_SIZE`` of
    trl/trainer/utils.py, read from its source: that module imports transformers). Hollow: trl, trl.kernels.
    Stubbed: transformers.utils (``is_triton_available``: whether triton imports) and, for the backward's import at
    call time, trl.trainer.utils (``maybe_gather_lm_head_ctx``: ZeRO-3's gather, a null context without
    DeepSpeed), placed in sys.modules for the process."""
    version = require("trl", TRL_VERSION)
    triton = importlib.util.find_spec("triton") is not None
    with stubbed_imports(("trl", "trl.kernels"), {"transformers": {}, "transformers.utils": {
            "is_triton_available": lambda: triton}}):
        module = importlib.import_module("trl.kernels.chunked_logprob")
    utils = types.ModuleType("trl.trainer.utils")
    utils.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
    sys.modules.setdefault("trl.trainer.utils", utils)
    source = package_dir("trl").joinpath("trainer", "utils.py").read_text()
    chunk_size = int(re.search(r"^_CHUNKED_LOGPROB_CHUNK_SIZE = (\d+)$", source, re.M).group(1))
    return types.SimpleNamespace(ChunkedLogProbFunction=module.ChunkedLogProbFunction, chunk_size=chunk_size,
                                 token_chunk_size=module.TOKEN_CHUNK_SIZE, version=version)


@functools.lru_cache(maxsize=None)
def liger_grpo() -> types.SimpleNamespace:
    """Liger-Kernel 0.8.5's fused linear GRPO loss, liger_kernel/chunked_loss/grpo_loss.py, as installed (nothing
    stubbed: the chunked losses import torch alone)."""
    version = require("liger-kernel", LIGER_VERSION)
    module = importlib.import_module("liger_kernel.chunked_loss.grpo_loss")
    return types.SimpleNamespace(LigerFusedLinearGRPOLoss=module.LigerFusedLinearGRPOLoss, version=version)
