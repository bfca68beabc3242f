"""ppo_ext.compat.trl against TRL 1.16.0's own GRPOTrainer._compute_loss.

TRL's code runs for real: trl/trainer/grpo_trainer.py is executed from the installed file (trl installed
with ``pip install --no-deps trl==1.16.0``; nothing of TRL is copied here) by tests/frameworks.py's ``trl()``
recipe (shared with the benchmark). What is stubbed, for the duration of the import only:

- ``trl`` and ``trl.trainer`` are hollow (their ``__init__`` files, which import transformers, are not
  executed); trl/trainer/grpo_trainer.py itself is real.
- Every name grpo_trainer.py imports from a package that is not installed here (transformers, accelerate,
  datasets, huggingface_hub, pandas) or from TRL's other modules is a stand-in: a stub class for a
  capitalised name, else a stub function that raises if called (read off the file's own import statements
  with ``ast``). The exceptions, which the import or the loss path calls: ``is_peft_available``,
  ``is_rich_available``, ``is_trackio_available``, ``is_wandb_available`` return False;
  ``get_logger`` is ``logging.getLogger``; ``profiling_decorator`` is the identity; ``nanmin`` and
  ``nanmax`` are TRL's own, compiled from trl/trainer/utils.py; ``GRPOConfig`` is TRL's own dataclass
  (trl/trainer/grpo_config.py and base_config.py, real, on a stand-in ``TrainingArguments``).
- torch, numpy and packaging are the real ones.

The trainer is ``object.__new__(GRPOTrainer)`` (``__init__`` would load a model) holding what
``_compute_loss`` reads: the attributes ``GRPOTrainer.__init__`` sets from ``args`` (``loss_type``,
``epsilon_low``/``epsilon_high``, ``beta``, ``importance_sampling_level``, ...), ``args`` itself (every
GRPOConfig field at TRL's default, then the case's options), ``current_gradient_accumulation_steps``, a
model stand-in with ``.training``, ``_metrics``, and ``FakeAccelerator`` (``num_processes``, ``reduce``,
``gather``, ``gather_for_metrics``, ``pad_across_processes``: identities for one process; for two, two
threads exchange their tensors through a barrier, so TRL's collectives really combine two ranks). The
model's forward, ``_get_per_token_logps_and_entropies``, is replaced on the instance by ``FakeForward``,
which returns the case's log-probs as a fresh leaf (requires grad), entropies and an optional MoE aux loss.
So TRL's own code computes the per-token loss, the masks, the aggregation, the gradient and the metrics;
compared with the adapter (and with ``PPOExtGRPOMixin`` on the same trainer): the loss, the gradient with
respect to the log-probs (float64) and every metric TRL logs, keys in order.

Without trl 1.16.0 the comparisons skip saying what to install (``PPO_EXT_REQUIRE_FRAMEWORKS=1`` makes
that a failure); the adapter's own tests (errors, unsupported options, shapes, dtypes) run anyway.
"""

import dataclasses
import functools
import math
import sys
import threading
import types
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import frameworks
from ppo_ext.compat import trl as ptrl

B, T, P = 8, 12, 3
EPS, EPS_HIGH = 0.2, 0.28
LOSS_TYPES = ptrl.SUPPORTED_LOSS_TYPES
CLIP_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
assert set(LOSS_TYPES) == set(CLIP_LOSS_TYPES) | {"cispo", "sapo", "vespo"}
# The loss families' options in every case unless a test sets them: cispo's bound (TRL's epsilon_high itself;
# 1.28 puts the clamp in force for some tokens of the cases; TRL's default, epsilon = 0.2, is refused), and
# sapo temperatures off their defaults and unlike each other (so swapping them shows), neither exact in float32;
# vespo's Gamma parameters likewise, and a per-token vLLM mode (TRL's __init__ refuses the default sequence_mask).
FAMILY_OPTIONS = {"cispo": {"epsilon_high": 1.28}, "sapo": {"sapo_temperature_pos": 0.7, "sapo_temperature_neg": 1.3},
                  "vespo": {"vespo_k_pos": 1.7, "vespo_lambda_pos": 2.3, "vespo_k_neg": 2.6, "vespo_lambda_neg": 1.1,
                            "vllm_importance_sampling_mode": "token_truncate"}}
LEVELS = ("token", "sequence")
TOL64 = dict(rtol=1e-10, atol=1e-12)
TOL32 = dict(rtol=2e-5, atol=1e-6)
MODEL = object()  # the `model` argument, handed on to the forward


# ----------------------------------------------------------------------------------------------------
# Loading TRL


@functools.lru_cache(maxsize=None)
def load_trl():
    """frameworks.trl() (TRL's own grpo_trainer.py and GRPOConfig), and the mixin on TRL's GRPOTrainer."""
    ns = frameworks.trl()
    assert ns.version == ptrl.TRL_VERSION
    mixed = type("MixedTrainer", (ptrl.PPOExtGRPOMixin, ns.GRPOTrainer), {})
    return SimpleNamespace(GRPOTrainer=ns.GRPOTrainer, GRPOConfig=ns.GRPOConfig, Mixed=mixed, module=ns.module,
                           version=ns.version)


@pytest.fixture(scope="module")
def trl():
    return frameworks.load_or_skip(load_trl)


def grpo_args(trl_ns, **overrides):
    """Every GRPOConfig field at TRL's default (the dataclass's own), then ``overrides``; steps_per_generation
    as GRPOConfig.__post_init__ sets it (gradient_accumulation_steps) when not given."""
    values = {}
    for field in dataclasses.fields(trl_ns.GRPOConfig):
        if field.default is not dataclasses.MISSING:
            values[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            values[field.name] = field.default_factory()
    values["gradient_accumulation_steps"] = 1  # TrainingArguments' default
    values.update(FAMILY_OPTIONS.get(overrides.get("loss_type"), {}))
    values.update(overrides)
    if values["steps_per_generation"] is None:
        values["steps_per_generation"] = values["gradient_accumulation_steps"]
    return SimpleNamespace(**values)


def plain_args(**overrides):
    """Args without TRL: GRPOConfig's defaults as the adapter knows them."""
    return SimpleNamespace(**{**ptrl.GRPO_CONFIG_DEFAULTS, **FAMILY_OPTIONS.get(overrides.get("loss_type"), {}),
                              **overrides})


def clip_options(loss_type):
    """A test's explicit clip bounds: the asymmetric epsilons for the clipped loss types; cispo and sapo
    keep FAMILY_OPTIONS (cispo's bound is epsilon_high itself, sapo reads neither)."""
    return dict(epsilon=EPS, epsilon_high=EPS_HIGH) if loss_type in CLIP_LOSS_TYPES else {}


# ----------------------------------------------------------------------------------------------------
# The trainer stand-ins


class _Group:
    """`size` ranks (threads) exchanging one value each per collective."""

    def __init__(self, size):
        self.size = size
        self._barrier = threading.Barrier(size, timeout=60)
        self._slots = [None] * size

    def exchange(self, rank, value):
        self._slots[rank] = value
        self._barrier.wait()
        values = list(self._slots)
        self._barrier.wait()
        return values


class FakeAccelerator:
    """What GRPOTrainer._compute_loss and get_high_entropy_mask use of accelerate's Accelerator, as rank
    `rank` of `group` (one process without a group). `num_processes` may claim more processes than the
    group has (a rank that sees only its own data)."""

    def __init__(self, group=None, rank=0, num_processes=None):
        self.group = group or _Group(1)
        self.rank = rank
        self.num_processes = num_processes or self.group.size
        self.calls = defaultdict(int)
        self.sync_gradients = True  # an optimizer-step boundary

    def reduce(self, tensor, reduction="sum"):
        assert reduction == "sum"
        self.calls["reduce"] += 1
        values = self.group.exchange(self.rank, tensor)
        return functools.reduce(lambda a, b: a + b, values)

    def gather(self, tensor):
        self.calls["gather"] += 1
        values = self.group.exchange(self.rank, tensor)
        return torch.cat([v.reshape(1) if v.dim() == 0 else v for v in values])

    gather_for_metrics = gather

    def pad_across_processes(self, tensor, dim=0, pad_index=0):
        assert dim == 0
        size = max(self.group.exchange(self.rank, tensor.shape[0]))
        pad = tensor.new_full((size - tensor.shape[0],) + tuple(tensor.shape[1:]), pad_index)
        return torch.cat([tensor, pad])


class FakeForward:
    """Stands in for _get_per_token_logps_and_entropies: the case's log-probs as a fresh leaf."""

    def __init__(self, logps, entropies, aux_loss=None):
        self.logps, self.entropies, self.aux_loss = logps, entropies, aux_loss
        self.calls, self.leaves, self.entropy_leaves = [], [], []

    def __call__(self, model, input_ids, attention_mask, logits_to_keep, **kwargs):
        self.calls.append(dict(model=model, input_ids=input_ids, attention_mask=attention_mask,
                               logits_to_keep=logits_to_keep, **kwargs))
        leaf = self.logps.detach().clone().requires_grad_(True)
        entropies = self.entropies.detach().clone().requires_grad_(True)  # the entropy bonus' gradient lands here
        self.leaves.append(leaf)
        self.entropy_leaves.append(entropies)
        aux = None if self.aux_loss is None else self.aux_loss.clone()
        return leaf, entropies, aux


def make_trainer(cls, args, forward, *, gas=1, accelerator=None, training=True, router_aux_loss_coef=0.0):
    trainer = object.__new__(cls)
    trainer.args = args
    # what GRPOTrainer.__init__ sets from args (trl/trainer/grpo_trainer.py)
    trainer.loss_type = args.loss_type
    trainer.importance_sampling_level = args.importance_sampling_level
    trainer.off_policy_mask_threshold = args.off_policy_mask_threshold
    trainer.top_entropy_quantile = args.top_entropy_quantile
    trainer.epsilon_low = args.epsilon
    trainer.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    trainer.beta = args.beta
    trainer.use_vllm = args.use_vllm
    trainer.vllm_importance_sampling_correction = args.vllm_importance_sampling_correction
    trainer.vllm_importance_sampling_mode = args.vllm_importance_sampling_mode
    trainer.max_completion_length = args.max_completion_length
    trainer.entropy_coef = args.entropy_coef
    trainer.use_adaptive_entropy = args.use_adaptive_entropy
    trainer._entropy_bonus_enabled = args.entropy_coef != 0.0 or args.use_adaptive_entropy
    trainer.router_aux_loss_coef = router_aux_loss_coef
    trainer.aux_loss_enabled = forward.aux_loss is not None and router_aux_loss_coef != 0.0
    # what transformers' Trainer and the training loop provide
    trainer.current_gradient_accumulation_steps = gas
    trainer.accelerator = accelerator or FakeAccelerator()
    trainer.model = SimpleNamespace(training=training)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._get_per_token_logps_and_entropies = forward
    return trainer


# ----------------------------------------------------------------------------------------------------
# Cases


def make_case(seed, *, batch=B, length=T, mask="ragged", adv="row", old=True, dtype=torch.float64, spread=0.3):
    """Log-probs and old log-probs whose log-ratios (a per-row offset plus per-token noise) put tokens and
    whole rows on both sides of the clip interval; masks: dense, ragged (right-padded, every row >= 1
    token), empty_rows (ragged, rows 1 and 4 empty), all_masked; advantages (B,) of alternating signs with
    one zero, or (B, T)."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    lp = -(torch.rand(batch, length, generator=g, dtype=f64) * 2.0 + 0.05)
    log_ratio = torch.randn(batch, 1, generator=g, dtype=f64) * spread + torch.randn(batch, length, generator=g,
                                                                                      dtype=f64) * spread
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    if mask == "dense":
        lengths[:] = length
    elif mask == "empty_rows":
        lengths[torch.tensor([1, 4]) % batch] = 0
    elif mask == "all_masked":
        lengths[:] = 0
    m = (torch.arange(length)[None, :] < lengths[:, None]).to(torch.int64)
    if adv == "row":
        signs = torch.tensor([1.0, -1.0], dtype=f64).repeat(batch)[:batch]
        advantages = signs * (torch.randn(batch, generator=g, dtype=f64).abs() + 0.1)
        if batch > 2:
            advantages[2] = 0.0
    else:
        advantages = torch.randn(batch, length, generator=g, dtype=f64)
    entropies = torch.rand(batch, length, generator=g, dtype=torch.float32) * 3.0
    sampling = (lp - log_ratio) + torch.randn(batch, length, generator=g, dtype=f64) * 0.2
    return dict(lp=lp.to(dtype), old=(lp - log_ratio).to(dtype) if old else None, advantages=advantages.to(dtype),
                mask=m, entropies=entropies, sampling=sampling.to(dtype),
                prompt_ids=torch.randint(0, 100, (batch, P), generator=g),
                completion_ids=torch.randint(0, 100, (batch, length), generator=g),
                ref=(lp + torch.randn(batch, length, generator=g, dtype=f64) * 0.5).to(dtype))


def _trl_ratio(case, args):
    """The capped ratio TRL's indicators compare, computed here only to keep cases off the boundaries."""
    lp, old, m = case["lp"].double(), case["old"], case["mask"].double()
    d = torch.zeros_like(lp) if old is None else lp - old.double()
    if args.importance_sampling_level == "sequence":
        d = ((d * m).sum(-1) / m.sum(-1).clamp(min=1.0))[:, None]
    return torch.exp(d)


def _bounds(args):
    """The values TRL compares its ratio with for args.loss_type."""
    eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    if args.loss_type == "cispo":
        return (eps_high,)  # torch.clamp(coef_1, max=epsilon_high); delta is not read
    if args.loss_type == "sapo":
        return ()
    return (1 - args.epsilon, 1 + eps_high) + ((args.delta,) if args.delta is not None else ())


def assert_off_bounds(case, args):
    r = _trl_ratio(case, args)
    for bound in _bounds(args):
        assert float((r - bound).abs().min()) > 1e-6, f"a ratio lies on the bound {bound}: pick another seed"


def make_inputs(case, *, num_items_in_batch=None, vllm_ratio=None, sampling=False, tool_mask=None):
    inputs = {
        "prompt_ids": case["prompt_ids"], "prompt_mask": torch.ones_like(case["prompt_ids"]),
        "completion_ids": case["completion_ids"], "completion_mask": case["mask"],
        "advantages": case["advantages"],
        "num_items_in_batch": case["mask"].sum() if num_items_in_batch is None else num_items_in_batch,
    }
    if case["old"] is not None:
        inputs["old_per_token_logps"] = case["old"]
    inputs["ref_per_token_logps"] = case["ref"]  # (TRL reads it with beta != 0 only)
    if vllm_ratio is not None:
        inputs["importance_sampling_ratio"] = vllm_ratio
    if sampling:
        inputs["sampling_per_token_logps"] = case["sampling"]
    if tool_mask is not None:
        inputs["tool_mask"] = tool_mask
    return inputs


Result = SimpleNamespace


def run_trainer(trl_ns, cls, args, case, inputs, *, gas=1, accelerator=None, aux_loss=None, router_coef=0.0,
                training=True, own=True):
    """cls's _compute_loss (TRL's own when `own`, else the class's, e.g. the mixin's), then backward."""
    forward = FakeForward(case["lp"], case["entropies"], aux_loss)
    trainer = make_trainer(cls, args, forward, gas=gas, accelerator=accelerator, training=training,
                           router_aux_loss_coef=router_coef)
    compute = trl_ns.GRPOTrainer._compute_loss.__get__(trainer) if own else trainer._compute_loss
    loss = compute(MODEL, inputs)
    loss.backward()
    mode = "train" if training else "eval"
    metrics = {key: values[-1] for key, values in trainer._metrics[mode].items()}
    return Result(loss=loss.detach(), grad=forward.leaves[-1].grad, metrics=metrics, calls=forward.calls,
                  trainer=trainer, entropy_grad=forward.entropy_leaves[-1].grad if forward.entropy_leaves else None)


def run_trl(trl_ns, args, case, inputs, **kwargs):
    return run_trainer(trl_ns, trl_ns.GRPOTrainer, args, case, inputs, own=True, **kwargs)


def run_mixin(trl_ns, args, case, inputs, **kwargs):
    return run_trainer(trl_ns, trl_ns.Mixed, args, case, inputs, own=False, **kwargs)


def run_adapter(args, case, inputs, *, gas=1, num_processes=1, accelerator=None, entropy_mask=None):
    lp = case["lp"].detach().clone().requires_grad_(True)
    entropies = case["entropies"].detach().clone().requires_grad_(True)
    loss, metrics = ptrl.grpo_loss(
        lp, inputs.get("old_per_token_logps"), inputs["advantages"],
        inputs["completion_mask"] * inputs["tool_mask"] if "tool_mask" in inputs else inputs["completion_mask"],
        args, num_items_in_batch=inputs.get("num_items_in_batch"),
        importance_sampling_ratio=inputs.get("importance_sampling_ratio"),
        sampling_per_token_logps=inputs.get("sampling_per_token_logps"), entropy_mask=entropy_mask,
        ref_per_token_logps=inputs.get("ref_per_token_logps"), entropies=entropies, gradient_accumulation_steps=gas, num_processes=num_processes,
        accelerator=accelerator)
    for value in metrics.values():
        assert value.dim() == 0 and value.dtype == torch.float32 and value.device == lp.device
    loss.backward()
    return Result(loss=loss.detach(), grad=lp.grad, metrics={k: v.item() for k, v in metrics.items()},
                  entropy_grad=entropies.grad)


def assert_same(theirs, ours, tol=TOL64):
    torch.testing.assert_close(ours.loss, theirs.loss, **tol)
    torch.testing.assert_close(ours.grad, theirs.grad, **tol)
    # the entropy bonus' gradient w.r.t. the entropies (None without a bonus: nothing reached them)
    assert (ours.entropy_grad is None) == (theirs.entropy_grad is None)
    if theirs.entropy_grad is not None:
        torch.testing.assert_close(ours.entropy_grad, theirs.entropy_grad, **tol)
    assert list(ours.metrics) == list(theirs.metrics)
    for key, expected in theirs.metrics.items():
        got = ours.metrics[key]
        if math.isnan(expected):
            assert math.isnan(got), key
        else:
            assert got == pytest.approx(expected, rel=1e-6, abs=1e-7), key


def compare(trl_ns, case, mixin=True, tol=TOL64, inputs_kw=None, **options):
    """TRL's _compute_loss, the adapter and the mixin on one case; the three must agree."""
    gas = options.pop("gas", 1)
    args = grpo_args(trl_ns, **options)
    assert_off_bounds(case, args)
    inputs = make_inputs(case, **(inputs_kw or {}))
    theirs = run_trl(trl_ns, args, case, inputs, gas=gas)
    ours = run_adapter(args, case, inputs, gas=gas)
    assert_same(theirs, ours, tol)
    if mixin:
        assert_same(theirs, run_mixin(trl_ns, args, case, inputs, gas=gas), tol)
    return theirs


def test_trl_is_the_installed_release(trl):
    """The code compared with is TRL's released file, executed from the installed package."""
    assert trl.version == ptrl.TRL_VERSION
    installed = frameworks.package_dir("trl") / "trainer" / "grpo_trainer.py"
    assert trl.GRPOTrainer._compute_loss.__code__.co_filename == str(installed)
    assert trl.GRPOTrainer.get_off_policy_mask.__code__.co_filename == str(installed)
    stand_ins = [name for name in ("transformers", "accelerate", "datasets", "huggingface_hub", "pandas",
                                   "trl.trainer.utils") if (getattr(sys.modules.get(name), "__doc__", None) or "")
                 .startswith("Stand-in for")]
    assert stand_ins == []  # sys.modules is put back after the import


# ----------------------------------------------------------------------------------------------------
# Parity: loss types x levels x advantages x masks


@pytest.mark.parametrize("adv", ["row", "token"])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_types_levels_advantages(trl, loss_type, level, adv):
    theirs = compare(trl, make_case(1, adv=adv, mask="empty_rows"), loss_type=loss_type,
                     importance_sampling_level=level, **clip_options(loss_type))
    assert list(theirs.metrics) == ["entropy", *ptrl.METRIC_KEYS_BY_LOSS_TYPE[loss_type]]
    # the case clips on both sides, so the metrics are not trivially 0
    if loss_type in CLIP_LOSS_TYPES:
        assert theirs.metrics["clip_ratio/low_mean"] > 0 and theirs.metrics["clip_ratio/high_mean"] > 0
    elif loss_type == "cispo":
        assert 0 < theirs.metrics["cispo_clip_ratio"] < 1
    elif loss_type == "vespo":  # the weights vary over the rows (not all 0, not all 1)
        assert 0.05 < theirs.metrics["vespo/phi_seq_mean"] < 0.95
    assert theirs.grad.abs().sum() > 0


@pytest.mark.parametrize("mask", ["dense", "ragged", "empty_rows", "all_masked"])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_masks(trl, loss_type, level, mask):
    theirs = compare(trl, make_case(2, mask=mask), loss_type=loss_type, importance_sampling_level=level)
    if mask == "all_masked":
        assert float(theirs.loss) == 0.0
        # per-row fractions: NaN for rows without a valid token (token level); at the sequence level with (B,)
        # advantages the indicators are per row already (an empty row's ratio is 1: 0)
        if loss_type in CLIP_LOSS_TYPES:
            assert math.isnan(theirs.metrics["clip_ratio/low_min"]) == (level == "token")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_symmetric_epsilon_and_on_policy(trl, loss_type):
    if loss_type == "cispo":  # epsilon_high=None is epsilon: a bound below 1 (test_cispo_epsilon_high_below_one)
        compare(trl, make_case(3), loss_type=loss_type, epsilon=0.25, epsilon_high=1.25)
    else:
        compare(trl, make_case(3), loss_type=loss_type, epsilon=0.25, epsilon_high=None)
    compare(trl, make_case(3, old=False), loss_type=loss_type)  # old_per_token_logps absent: ratio 1


@pytest.mark.parametrize("adv", ["row", "token"])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("delta", [1.1, 1.5])  # below and above 1 + epsilon_high = 1.28
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo"])
def test_delta(trl, loss_type, delta, level, adv):
    """delta caps the clipped loss types' coef_1; TRL applies it to neither cispo nor sapo (nor their metric)."""
    case = make_case(4, adv=adv, spread=0.35)
    theirs = compare(trl, case, loss_type=loss_type, delta=delta, importance_sampling_level=level,
                     **clip_options(loss_type))
    args = grpo_args(trl, delta=delta, importance_sampling_level=level)
    assert bool((_trl_ratio(case, args) > delta).any())  # the cap is reached
    if loss_type in CLIP_LOSS_TYPES and delta < 1 + EPS_HIGH:  # the capped ratio never exceeds 1 + epsilon_high
        assert theirs.metrics["clip_ratio/high_mean"] == 0.0
    if loss_type == "cispo":  # uncapped: ratios above epsilon_high = 1.28 > delta = 1.1 are counted
        assert theirs.metrics["cispo_clip_ratio"] > 0
    if loss_type in ("cispo", "sapo"):  # TRL's numbers are those without delta
        no_delta = compare(trl, case, loss_type=loss_type, importance_sampling_level=level)
        assert torch.equal(no_delta.loss, theirs.loss) and torch.equal(no_delta.grad, theirs.grad)
        assert no_delta.metrics == theirs.metrics


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("shape", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_vllm_importance_sampling_ratio(trl, loss_type, shape, level):
    case = make_case(5)
    g = torch.Generator().manual_seed(50)
    width = T if shape == "token" else 1
    ratio = (torch.rand(B, width, generator=g, dtype=torch.float64) * 1.5 + 0.25)
    ratio[0] = 0.0  # a masked-out ("*_mask" mode) sequence or token
    if loss_type == "vespo" and shape == "token":
        # TRL sums vespo's log(ratio) over every position, where its own ratio is 1 at masked ones (computed from
        # a masked difference); the adapter reads valid positions only, so the case is one TRL makes
        ratio = torch.where(case["mask"].bool(), ratio, 1.0)
    # TRL computes the ratio from the old log-probs, in their dtype; float32 here (not vespo): a weight's rounding
    ratio = ratio if loss_type == "vespo" else ratio.float()
    options = dict(loss_type=loss_type, importance_sampling_level=level, use_vllm=True,
                   vllm_importance_sampling_correction=True, inputs_kw=dict(vllm_ratio=ratio))
    if loss_type == "vespo" and shape == "sequence":  # TRL's __init__ refuses its sequence modes for vespo
        with pytest.raises(ValueError, match="per-token importance_sampling_ratio"):
            run_adapter(grpo_args(trl, **{k: v for k, v in options.items() if k != "inputs_kw"}), case,
                        make_inputs(case, vllm_ratio=ratio))
        return
    compare(trl, case, **options)


def _avg_kl(case, sampling):
    ref = case["sampling"] if sampling else (case["old"] if case["old"] is not None else case["lp"])
    m = case["mask"].double()
    return ((ref - case["lp"]).double() * m).sum(-1) / m.sum(-1).clamp(min=1.0)


@pytest.mark.parametrize("source", ["sampling", "old", "on_policy"])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "luspo", "cispo", "sapo", "vespo"])
def test_off_policy_mask(trl, loss_type, level, source):
    case = make_case(6, old=source != "on_policy", spread=0.4)
    kl = _avg_kl(case, source == "sampling").sort().values
    threshold = float((kl[B // 2] + kl[B // 2 - 1]) / 2) if source != "on_policy" else 0.0
    if source != "on_policy":  # some negative-advantage rows are dropped, some kept
        dropped = (_avg_kl(case, source == "sampling") > threshold) & (case["advantages"] < 0)
        assert 0 < int(dropped.sum()) < int((case["advantages"] < 0).sum())
    compare(trl, case, loss_type=loss_type, importance_sampling_level=level, off_policy_mask_threshold=threshold,
            inputs_kw=dict(sampling=source == "sampling"))


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", ["dapo", "cispo", "sapo", "vespo"])
def test_off_policy_mask_with_token_advantages_and_vllm_ratio(trl, loss_type, level):
    case = make_case(7, adv="token")
    kl = _avg_kl(case, True).sort().values
    ratio = torch.rand(B, T, generator=torch.Generator().manual_seed(70), dtype=torch.float64) + 0.5
    ratio = torch.where(case["mask"].bool(), ratio, 1.0)  # as TRL makes it (test_vllm_importance_sampling_ratio)
    compare(trl, case, loss_type=loss_type, importance_sampling_level=level,
            off_policy_mask_threshold=float((kl[3] + kl[4]) / 2), use_vllm=True,
            inputs_kw=dict(sampling=True, vllm_ratio=ratio))


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("gas,spg", [(2, 2), (4, 4), (2, 4), (3, 1)])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradient_accumulation(trl, loss_type, gas, spg, level):
    case = make_case(8)
    n = torch.tensor(int(case["mask"].sum()) * spg + 5)  # the generation batch's valid tokens
    compare(trl, case, loss_type=loss_type, gas=gas, gradient_accumulation_steps=gas, steps_per_generation=spg,
            importance_sampling_level=level, inputs_kw=dict(num_items_in_batch=n))


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", ["dapo", "cispo"])
def test_num_items_in_batch(trl, loss_type, level):
    """dapo's and cispo's normaliser, TRL's inputs["num_items_in_batch"] (a tensor in TRL; 0 is clamped to 1);
    the adapter also takes a number, and without it this batch's N (what TRL gets for one process and gas 1)."""
    case = make_case(17, mask="empty_rows")
    options = dict(loss_type=loss_type, importance_sampling_level=level)
    n_valid = int(case["mask"].sum())
    results = {}
    for n in (53, 106, 0, n_valid):
        results[n] = compare(trl, case, gas=2, gradient_accumulation_steps=2, **options,
                             inputs_kw=dict(num_items_in_batch=torch.tensor(n)))
        as_number = run_adapter(grpo_args(trl, gradient_accumulation_steps=2, **options), case,
                                {**make_inputs(case), "num_items_in_batch": n}, gas=2)
        assert_same(results[n], as_number)
    torch.testing.assert_close(results[106].loss * 2, results[53].loss, **TOL64)  # the normaliser is read
    torch.testing.assert_close(results[0].loss, results[53].loss * 53, **TOL64)  # max(n, 1)
    without = run_adapter(grpo_args(trl, **options), case, {**make_inputs(case), "num_items_in_batch": None})
    assert_same(run_trl(trl, grpo_args(trl, **options), case, make_inputs(case)), without)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_max_completion_length(trl, loss_type):
    compare(trl, make_case(9), loss_type=loss_type, max_completion_length=37)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_float32(trl, loss_type, level):
    compare(trl, make_case(10, dtype=torch.float32), tol=TOL32, loss_type=loss_type, importance_sampling_level=level)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo"])
def test_one_column(trl, loss_type, level):
    """T = 1: TRL reads the clip indicators of every row, masked ones too; so does the adapter."""
    compare(trl, make_case(11, length=1, mask="empty_rows", spread=0.5), loss_type=loss_type,
            importance_sampling_level=level)


# ----------------------------------------------------------------------------------------------------
# cispo and sapo: TRL's bound, its temperatures, what it refuses or ignores


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("eps_high,seed,spread,mask", [(1.0, 1, 0.3, "ragged"), (1.28, 1, 0.3, "empty_rows"),
                                                       (2.5, 45, 1.0, "empty_rows"), (5.0, 45, 1.0, "empty_rows")])
def test_cispo_epsilon_high(trl, level, eps_high, seed, spread, mask):
    """TRL's cispo clamps coef_1 at epsilon_high itself (5.0 is its recommended value); the clamp is in force
    for some tokens (or rows) and not others, and changes TRL's own gradient. (With 1.0 the case has no empty
    row: at the sequence level their ratio, 1, would lie on the bound.)"""
    case = make_case(seed, mask=mask, spread=spread)
    theirs = compare(trl, case, loss_type="cispo", importance_sampling_level=level, epsilon_high=eps_high)
    args = grpo_args(trl, loss_type="cispo", importance_sampling_level=level, epsilon_high=eps_high)
    valid = case["mask"].bool()
    clamped = (_trl_ratio(case, args) > eps_high).expand(B, T) & valid
    assert 0 < int(clamped.sum()) < int(valid.sum())
    positive = clamped & (case["advantages"][:, None] > 0)
    assert int(positive.sum()) > 0 and theirs.metrics["cispo_clip_ratio"] > 0
    unclamped = run_trl(trl, grpo_args(trl, loss_type="cispo", importance_sampling_level=level, epsilon_high=1e6),
                        case, make_inputs(case))
    assert not torch.allclose(unclamped.grad, theirs.grad)
    assert unclamped.metrics["cispo_clip_ratio"] == 0.0


@pytest.mark.parametrize("eps_high", [None, 0.28, 0.999999, -1.0, math.inf, math.nan, 2.0 ** 53 + 2])
def test_cispo_epsilon_high_it_cannot_express_is_refused(trl, eps_high):
    """ppo_ext's cispo clamps at 1 + clip_high, clip_high finite and >= 0: TRL's bound epsilon_high < 1 (its
    default: None is epsilon, 0.2) cannot be reproduced, nor one that 1 + (e - 1) does not give back exactly."""
    case = make_case(18)
    args = grpo_args(trl, loss_type="cispo", epsilon_high=eps_high)
    if eps_high is not None and math.isfinite(eps_high) and eps_high < 1:
        assert torch.isfinite(run_trl(trl, args, case, make_inputs(case)).loss)  # a configuration TRL runs
    shown = EPS if eps_high is None else eps_high
    with pytest.raises(ValueError, match=f"epsilon_high={shown}"):
        run_adapter(args, case, make_inputs(case))


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("pos,neg", [(1.0, 1.05), (0.3, 2.5), (2.5, 0.3), (1.0, 1.0), (8.0, 0.05)])
def test_sapo_temperatures(trl, level, pos, neg):
    """sapo_temperature_pos where A > 0, sapo_temperature_neg elsewhere (the defaults, and others); swapped
    temperatures give another loss and gradient, so the comparison sees the difference."""
    case = make_case(19, adv="token", mask="empty_rows", spread=0.5)
    options = dict(loss_type="sapo", importance_sampling_level=level)
    theirs = compare(trl, case, sapo_temperature_pos=pos, sapo_temperature_neg=neg, **options)
    assert list(theirs.metrics) == ["entropy"]
    if pos != neg:
        swapped = run_adapter(grpo_args(trl, sapo_temperature_pos=neg, sapo_temperature_neg=pos, **options), case,
                              make_inputs(case))
        assert not torch.allclose(swapped.loss, theirs.loss, **TOL64)
        assert not torch.allclose(swapped.grad, theirs.grad, **TOL64)


@pytest.mark.parametrize("default_dtype", [torch.float32, torch.float64])
def test_sapo_temperatures_take_torchs_default_dtype(trl, default_dtype):
    """TRL's torch.where(advantages > 0, pos, neg) makes the temperatures a tensor of torch's default dtype:
    with float32 (the usual default) 1.3 is 1.2999999523..., even for float64 log-probs; the adapter does the
    same, so its float64 numbers follow the default dtype as TRL's do."""
    case = make_case(19, spread=0.5)
    options = dict(loss_type="sapo", sapo_temperature_pos=0.7, sapo_temperature_neg=1.3)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        theirs = compare(trl, case, **options)
    finally:
        torch.set_default_dtype(previous)
    other = torch.float64 if default_dtype == torch.float32 else torch.float32
    torch.set_default_dtype(other)
    try:
        elsewhere = run_trl(trl, grpo_args(trl, **options), case, make_inputs(case))
    finally:
        torch.set_default_dtype(previous)
    assert not torch.allclose(elsewhere.loss, theirs.loss, **TOL64)  # the rounding shows at float64


@pytest.mark.parametrize("adv", ["row", "token"])
@pytest.mark.parametrize("params", [(2.0, 3.0, 3.0, 2.0),  # GRPOConfig's defaults
                                    (1.7, 2.3, 2.6, 1.1), (0.5, -1.0, 1.5, 1e-6)])  # lambdas below 1e-4: clamped
def test_vespo_parameters(trl, params, adv):
    """(k_pos, lambda_pos) where A >= 0, (k_neg, lambda_neg) elsewhere; swapped they give other numbers."""
    case = make_case(21, adv=adv, spread=0.2)
    names = ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")
    theirs = compare(trl, case, loss_type="vespo", **dict(zip(names, params)))
    assert 0 < theirs.metrics["vespo/phi_seq_mean"] and theirs.grad.abs().sum() > 0
    swapped = dict(zip(names, params[2:] + params[:2]))
    assert not torch.allclose(compare(trl, case, loss_type="vespo", **swapped).grad, theirs.grad)


def test_vespo_row_log_weight_clamps(trl):
    """Rows whose log-ratios sum beyond [log(1e-8), 20] (spread 3 over 12 tokens), and log-ratios beyond 20."""
    case = make_case(22, spread=3.0)
    case["old"][0, 0] = case["lp"][0, 0] - 30.0
    theirs = compare(trl, case, loss_type="vespo", vespo_k_pos=0.2, vespo_k_neg=0.3)
    assert theirs.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["sapo_temperature_pos", "sapo_temperature_neg"])
@pytest.mark.parametrize("value", [0.0, -1.0, math.inf, math.nan, 1e-50, 1e40])
def test_sapo_temperature_it_cannot_take_is_refused(name, value):
    """ppo_ext's sapo takes finite temperatures > 0, as TRL's torch.where makes them (1e-50 is 0 in float32,
    1e40 is inf); TRL would divide by them."""
    case = make_case(35)
    with pytest.raises(ValueError, match=name):
        run_adapter(plain_args(loss_type="sapo", **{name: value}), case, make_inputs(case))
    with pytest.raises(TypeError, match=name):
        run_adapter(plain_args(loss_type="sapo", **{name: "1.0"}), case, make_inputs(case))


@pytest.mark.parametrize("loss_type", ["cispo", "sapo"])
def test_options_trl_does_not_read_are_not_passed(trl, loss_type):
    """TRL's cispo reads neither epsilon nor delta, its sapo no clip option at all: values ppo_ext would refuse
    for the clipped surrogate (a negative epsilon, delta <= 0) change nothing."""
    case = make_case(36)
    ignored = dict(epsilon=-0.5, delta=-1.0)
    if loss_type == "sapo":
        ignored["epsilon_high"] = -0.3
    theirs = compare(trl, case, loss_type=loss_type, **ignored)
    plain = compare(trl, case, loss_type=loss_type)
    assert torch.equal(theirs.loss, plain.loss) and theirs.metrics == plain.metrics


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("eps_high", [1.0, 1.28, 5.0])
def test_cispo_clip_ratio_is_the_cores_clipped_active(level, eps_high):
    """The module docstring's claim: TRL's cispo_clip_ratio (per-token indicators) is ppo_ext's clipped_active
    count over the valid tokens, with clip_low=1 (no lower bound) and clip_high = epsilon_high - 1."""
    import ppo_ext

    case = make_case(45, adv="token", mask="empty_rows", spread=1.0)
    _, metrics = ptrl.grpo_loss(case["lp"], case["old"], case["advantages"], case["mask"],
                                plain_args(loss_type="cispo", epsilon_high=eps_high, importance_sampling_level=level))
    core = ppo_ext.policy_loss(case["lp"], case["old"], case["advantages"], case["mask"], loss_type="cispo",
                               clip_low=1.0, clip_high=eps_high - 1, importance_sampling=ptrl._LEVELS[level])
    counts = dict(zip(ppo_ext.COUNT_NAMES, core.counts.tolist()))
    assert counts["clipped_active"] > 0 and counts["clipped_low"] == 0
    assert float(metrics["cispo_clip_ratio"]) == pytest.approx(counts["clipped_active"] / counts["valid_tokens"])


# ----------------------------------------------------------------------------------------------------
# The KL to the reference model (beta, use_bias_correction_kl)


@pytest.mark.parametrize("bias", [True, False], ids=["bias_corrected", "plain"])
@pytest.mark.parametrize("adv", ["row", "token"])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_beta(trl, loss_type, level, adv, bias):
    if loss_type == "vespo" and level == "sequence" and bias:  # refused: two levels in one call
        case = make_case(40, adv=adv)
        with pytest.raises(NotImplementedError, match="use_bias_correction_kl"):
            run_adapter(plain_args(loss_type=loss_type, importance_sampling_level=level, beta=0.04), case,
                        make_inputs(case))
        return
    theirs = compare(trl, make_case(40, adv=adv, mask="empty_rows"), loss_type=loss_type, importance_sampling_level=level,
                     beta=0.04, use_bias_correction_kl=bias, **clip_options(loss_type))
    assert list(theirs.metrics) == ["kl", "entropy", *ptrl.METRIC_KEYS_BY_LOSS_TYPE[loss_type]]
    assert theirs.metrics["kl"] > 0.01
    # the KL term changes the loss and the gradient (the case would not show a dropped term otherwise)
    without = run_trl(trl, grpo_args(trl, loss_type=loss_type, importance_sampling_level=level, beta=0.0,
                                     **clip_options(loss_type)), make_case(40, adv=adv, mask="empty_rows"),
                      make_inputs(make_case(40, adv=adv, mask="empty_rows")))
    assert float((theirs.grad - without.grad).abs().max()) > 1e-5  # (the parity tolerance is 1e-10)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "bnpo"])
def test_beta_with_everything(trl, loss_type):
    """beta with delta, on-policy, gradient accumulation, float32, the vLLM ratio and the off-policy mask (weights
    the KL does not take)."""
    compare(trl, make_case(41, old=False), loss_type=loss_type, beta=0.1, delta=1.4, **clip_options(loss_type))
    compare(trl, make_case(42), loss_type=loss_type, beta=0.1, gas=3, steps_per_generation=6)
    compare(trl, make_case(43, dtype=torch.float32), tol=TOL32, loss_type=loss_type, beta=0.02,
            importance_sampling_level="sequence")
    case = make_case(44, mask="empty_rows")
    vllm_ratio = torch.exp(torch.randn(B, T, generator=torch.Generator().manual_seed(45), dtype=torch.float64) * 0.1)
    compare(trl, case, inputs_kw=dict(vllm_ratio=vllm_ratio, sampling=True), loss_type=loss_type, beta=0.05,
            use_vllm=True, vllm_importance_sampling_mode="token_truncate", off_policy_mask_threshold=0.05)
    far = make_case(48)
    far["ref"] = far["lp"] + 4.0  # k3 = e^4 - 5 ~ 50 per token: TRL does not clamp it (verl's k3 stops at 10)
    theirs = compare(trl, far, loss_type=loss_type, beta=0.01, use_bias_correction_kl=False)
    assert theirs.metrics["kl"] == pytest.approx(math.exp(4.0) - 5.0, rel=1e-6)


def test_beta_needs_ref_per_token_logps():
    case = make_case(47)
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        ptrl.grpo_loss(case["lp"], case["old"], case["advantages"], case["mask"], plain_args(beta=0.04))
    with pytest.raises(ValueError, match="beta must be a finite number"):
        ptrl.grpo_loss(case["lp"], case["old"], case["advantages"], case["mask"], plain_args(beta=math.nan),
                       ref_per_token_logps=case["ref"])


# ----------------------------------------------------------------------------------------------------
# The entropy bonus (a static entropy_coef)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_entropy_bonus(trl, loss_type, level):
    theirs = compare(trl, make_case(50, mask="empty_rows"), loss_type=loss_type, importance_sampling_level=level,
                     entropy_coef=0.03, **clip_options(loss_type))
    assert list(theirs.metrics)[:2] == ["policy_loss", "entropy_coef"]
    assert theirs.entropy_grad is not None and theirs.entropy_grad.abs().sum() > 0


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "sapo"])
def test_entropy_bonus_with_everything(trl, loss_type):
    """with beta, gradient accumulation, the entropy mask (the bonus acts on its tokens), two processes"""
    compare(trl, make_case(51), loss_type=loss_type, entropy_coef=0.02, beta=0.04, gas=2)
    case = make_case(52, mask="empty_rows")
    args = grpo_args(trl, loss_type=loss_type, top_entropy_quantile=0.5, entropy_coef=0.05)
    inputs = make_inputs(case)
    theirs = run_trl(trl, args, case, inputs)
    mask = trl.GRPOTrainer.get_high_entropy_mask(theirs.trainer, case["entropies"], case["mask"], 0.5)
    assert_same(theirs, run_adapter(args, case, inputs, entropy_mask=mask))
    assert_same(theirs, run_mixin(trl, args, case, inputs))
    compare_two_ranks(trl, grpo_args(trl, loss_type=loss_type, entropy_coef=0.05),
                      [make_case(53, mask="empty_rows"), make_case(54, mask="ragged")])


def test_entropy_bonus_needs_entropies():
    case = make_case(55)
    with pytest.raises(ValueError, match="pass entropies"):
        ptrl.grpo_loss(case["lp"], case["old"], case["advantages"], case["mask"], plain_args(entropy_coef=0.1))


# ----------------------------------------------------------------------------------------------------
# Two processes


def _run_ranks(fns):
    results, errors = [None] * len(fns), []

    def work(rank):
        try:
            results[rank] = fns[rank]()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(rank,)) for rank in range(len(fns))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def compare_two_ranks(trl_ns, args, cases):
    """TRL's _compute_loss, the adapter and the mixin on two ranks (threads exchanging through a _Group), each
    rank holding one case, num_items_in_batch the tokens of both; the three must agree on each rank. Returns TRL's
    results and the inputs."""
    n = sum(c["mask"].sum() for c in cases)  # TRL: accelerator.gather(loss_mask.sum()).sum()
    inputs = [make_inputs(c, num_items_in_batch=n) for c in cases]

    def ranks(run):
        group = _Group(2)
        return _run_ranks([functools.partial(run, rank, FakeAccelerator(group, rank)) for rank in (0, 1)])

    theirs = ranks(lambda r, acc: run_trl(trl_ns, args, cases[r], inputs[r], accelerator=acc))
    ours = ranks(lambda r, acc: run_adapter(args, cases[r], inputs[r], num_processes=2, accelerator=acc))
    mixin = ranks(lambda r, acc: run_mixin(trl_ns, args, cases[r], inputs[r], accelerator=acc))
    for rank in (0, 1):
        assert_same(theirs[rank], ours[rank])
        assert_same(theirs[rank], mixin[rank])
    return theirs, inputs


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_two_processes(trl, loss_type, level, beta):
    """Each rank's loss (the normalisation by num_processes, the global num_items_in_batch) and TRL's
    global metrics (accelerator.reduce / gather across the two ranks), the KL's included."""
    cases = [make_case(20, mask="empty_rows"), make_case(21, mask="ragged")]
    bias = not (loss_type == "vespo" and level == "sequence")  # (refused with the bias correction: test_beta)
    args = grpo_args(trl, loss_type=loss_type, importance_sampling_level=level, beta=beta,
                     use_bias_correction_kl=bias, **clip_options(loss_type))
    theirs, inputs = compare_two_ranks(trl, args, cases)
    assert theirs[0].metrics == theirs[1].metrics  # global metrics: the same on both ranks
    # without an accelerator: the same loss and gradient, this rank's own metrics (TRL's with local collectives)
    for rank in (0, 1):
        local = run_adapter(args, cases[rank], inputs[rank], num_processes=2)
        alone = run_trl(trl, args, cases[rank], inputs[rank], accelerator=FakeAccelerator(num_processes=2))
        assert_same(alone, local)
        torch.testing.assert_close(local.loss, theirs[rank].loss, **TOL64)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_adapter_uses_one_reduce_and_one_gather(loss_type):
    """One reduce, and one gather for the clipped loss types' per-row metrics; cispo has no per-row metric,
    sapo without entropies no metric at all (and calls no collective)."""
    case = make_case(22)
    acc = FakeAccelerator()
    run_adapter(plain_args(loss_type=loss_type), case, make_inputs(case), accelerator=acc)
    assert dict(acc.calls) == ({"reduce": 1, "gather": 1} if loss_type in CLIP_LOSS_TYPES else {"reduce": 1})
    acc = FakeAccelerator()
    _, metrics = ptrl.grpo_loss(case["lp"], case["old"], case["advantages"], case["mask"],
                                plain_args(loss_type=loss_type), accelerator=acc)
    assert list(metrics) == list(ptrl.METRIC_KEYS_BY_LOSS_TYPE[loss_type])
    assert sum(acc.calls.values()) == (0 if loss_type == "sapo" else acc.calls["reduce"] + acc.calls["gather"])
    assert acc.calls["reduce"] == (0 if loss_type == "sapo" else 1)


# ----------------------------------------------------------------------------------------------------
# The entropy mask (top_entropy_quantile < 1), through TRL's own get_high_entropy_mask


@pytest.mark.parametrize("quantile", [0.5, 0.2])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo"])
def test_top_entropy_quantile(trl, loss_type, quantile):
    case = make_case(12, mask="empty_rows")
    args = grpo_args(trl, loss_type=loss_type, top_entropy_quantile=quantile)
    inputs = make_inputs(case)
    theirs = run_trl(trl, args, case, inputs)
    mixin = run_mixin(trl, args, case, inputs)
    assert_same(theirs, mixin)
    entropy_mask = theirs.trainer.get_high_entropy_mask(case["entropies"], case["mask"], 1 - quantile)
    assert 0 < int(entropy_mask.sum()) < int(case["mask"].sum())
    assert_same(theirs, run_adapter(args, case, inputs, entropy_mask=entropy_mask))


# ----------------------------------------------------------------------------------------------------
# The mixin


def test_mixin_calls_the_forward_as_trl_does(trl):
    case = make_case(13)
    args = grpo_args(trl, loss_type="dapo")
    tool_mask = (torch.rand(B, T, generator=torch.Generator().manual_seed(130)) > 0.2).to(torch.int64)
    inputs = make_inputs(case, tool_mask=tool_mask)
    inputs["pixel_values"] = torch.ones(2, 3)
    theirs = run_trl(trl, args, case, inputs)
    ours = run_mixin(trl, args, case, inputs)
    assert_same(theirs, ours)
    assert len(theirs.calls) == len(ours.calls) == 1
    a, b = theirs.calls[0], ours.calls[0]
    assert sorted(a) == sorted(b)
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] is b[key] or a[key] == b[key], key


@pytest.mark.parametrize("entropy_coef", [0.0, 0.05])
def test_mixin_adds_the_router_aux_loss(trl, entropy_coef):
    case = make_case(14)
    args = grpo_args(trl, loss_type="grpo", entropy_coef=entropy_coef)
    inputs = make_inputs(case)
    aux = torch.tensor(0.7, dtype=torch.float64)
    theirs = run_trl(trl, args, case, inputs, gas=2, aux_loss=aux, router_coef=0.01)
    ours = run_mixin(trl, args, case, inputs, gas=2, aux_loss=aux, router_coef=0.01)
    assert "aux_loss" in theirs.metrics
    assert_same(theirs, ours)


def test_mixin_logs_entropy_coef_on_optimizer_steps_only(trl):
    case = make_case(17)
    args = grpo_args(trl, loss_type="dapo", entropy_coef=0.05)
    inputs = make_inputs(case)
    results = []
    for run in (run_trl, run_mixin):
        accelerator = FakeAccelerator()
        accelerator.sync_gradients = False  # inside an accumulation window
        results.append(run(trl, args, case, inputs, gas=2, accelerator=accelerator))
    assert "entropy_coef" not in results[0].metrics and "policy_loss" in results[0].metrics
    assert_same(*results)


def test_mixin_in_eval_mode_is_trl(trl, monkeypatch):
    case = make_case(15)
    args = grpo_args(trl, loss_type="dapo", gradient_accumulation_steps=4)
    inputs = make_inputs(case)
    theirs = run_trl(trl, args, case, inputs, gas=4, training=False)
    monkeypatch.setattr(ptrl, "grpo_loss", None)  # the mixin must not reach it in eval mode
    ours = run_mixin(trl, args, case, inputs, gas=4, training=False)
    assert_same(theirs, ours)


def test_mixin_refuses_unsupported_options_before_the_forward(trl):
    case = make_case(16)
    for options, words, error in [
            ({"loss_type": "vespo", "use_vllm": True, "vllm_importance_sampling_mode": "sequence_mask"},
             ("VESPO", "token_truncate"), ValueError),
            ({"loss_type": "vespo", "beta": 0.04, "importance_sampling_level": "sequence"},
             ("use_bias_correction_kl",), NotImplementedError),
            ({"use_adaptive_entropy": True}, ("use_adaptive_entropy",), NotImplementedError),
            ({"loss_type": "cispo", "epsilon_high": None}, ("epsilon_high=0.2", "cispo"), ValueError),
            ({"loss_type": "cispo", "epsilon_high": 0.28}, ("epsilon_high=0.28", "cispo"), ValueError),
            ({"loss_type": "sapo", "sapo_temperature_neg": 0.0}, ("sapo_temperature_neg",), ValueError)]:
        args = grpo_args(trl, **options)
        forward = FakeForward(case["lp"], case["entropies"])
        trainer = make_trainer(trl.Mixed, args, forward)
        with pytest.raises(error) as info:
            trainer._compute_loss(MODEL, make_inputs(case))
        assert all(word in str(info.value) for word in words), (options, str(info.value))
        assert forward.calls == []


def test_trainer_class_is_built_on_trl(trl, monkeypatch):
    fake = types.ModuleType("trl")
    fake.GRPOTrainer = trl.GRPOTrainer
    monkeypatch.setitem(sys.modules, "trl", fake)
    ptrl.__dict__.pop("PPOExtGRPOTrainer", None)
    try:
        cls = ptrl.PPOExtGRPOTrainer
        assert ptrl.PPOExtGRPOTrainer is cls  # built once
    finally:
        ptrl.__dict__.pop("PPOExtGRPOTrainer", None)
    assert cls.__mro__[1:3] == (ptrl.PPOExtGRPOMixin, trl.GRPOTrainer)
    assert cls._compute_loss is ptrl.PPOExtGRPOMixin._compute_loss


def test_trainer_class_without_trl_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)
    ptrl.__dict__.pop("PPOExtGRPOTrainer", None)
    with pytest.raises(ImportError, match="PPOExtGRPOMixin"):
        ptrl.PPOExtGRPOTrainer
    with pytest.raises(AttributeError):
        ptrl.no_such_name


# ----------------------------------------------------------------------------------------------------
# The adapter alone (no TRL needed)


def test_defaults_are_grpo_configs(trl):
    fields = {f.name: f.default for f in dataclasses.fields(trl.GRPOConfig)}
    assert {k: fields[k] for k in ptrl.GRPO_CONFIG_DEFAULTS} == ptrl.GRPO_CONFIG_DEFAULTS


def test_args_as_mapping_and_missing_fields_take_the_defaults():
    case = make_case(30)
    inputs = make_inputs(case)
    full = run_adapter(plain_args(loss_type="bnpo"), case, inputs)
    for args in ({"loss_type": "bnpo"}, SimpleNamespace(loss_type="bnpo")):
        assert_same(full, run_adapter(args, case, inputs))


@pytest.mark.parametrize("options,words", [
    ({"use_adaptive_entropy": True}, ("use_adaptive_entropy",)),
])
def test_unsupported_options_raise(options, words):
    case = make_case(31)
    with pytest.raises(NotImplementedError) as info:
        run_adapter(plain_args(**options), case, make_inputs(case))
    assert all(word in str(info.value) for word in words)


def test_bad_options_raise():
    case = make_case(32)
    inputs = make_inputs(case)
    with pytest.raises(ValueError, match="Unknown loss type"):
        run_adapter(plain_args(loss_type="ppo"), case, inputs)
    with pytest.raises(ValueError, match="importance sampling level"):
        run_adapter(plain_args(importance_sampling_level="seq"), case, inputs)
    with pytest.raises(ValueError, match="pass importance_sampling_ratio"):
        run_adapter(plain_args(use_vllm=True), case, inputs)
    with pytest.raises(ValueError, match="applies it only when"):
        run_adapter(plain_args(), case, {**inputs, "importance_sampling_ratio": torch.ones(B, T)})
    with pytest.raises(ValueError, match="pass entropy_mask"):
        run_adapter(plain_args(top_entropy_quantile=0.5), case, inputs)
    with pytest.raises(ValueError, match="top_entropy_quantile < 1"):
        run_adapter(plain_args(), case, inputs, entropy_mask=torch.ones(B, T, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape"):
        run_adapter(plain_args(use_vllm=True), case, {**inputs, "importance_sampling_ratio": torch.ones(B, T + 1)})
    with pytest.raises(ValueError, match="max_completion_length"):
        run_adapter(plain_args(loss_type="dr_grpo", max_completion_length=None), case, inputs)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        run_adapter(plain_args(), case, inputs, gas=0)
    with pytest.raises(ValueError, match="needs args"):
        ptrl.grpo_loss(case["lp"], case["old"], case["advantages"], case["mask"], None)


@pytest.mark.parametrize("delta", [None, 1.3, 2.0])
def test_region_mean_is_the_cores_clipfrac_active(delta):
    """The module docstring's claim: without delta, or delta >= 1 + epsilon_high, TRL's region is where the
    clip is in force (ppo_ext's clipfrac_active), for per-token indicators."""
    import ppo_ext

    case = make_case(34, mask="empty_rows", spread=0.4)
    _, metrics = ptrl.grpo_loss(case["lp"], case["old"], case["advantages"], case["mask"],
                                plain_args(epsilon_high=EPS_HIGH, delta=delta))
    core = ppo_ext.policy_loss(case["lp"], case["old"], case["advantages"], case["mask"], clip_low=EPS,
                               clip_high=EPS_HIGH, ratio_cap=delta)
    assert float(core.metrics["clipfrac_active"]) > 0
    assert float(metrics["clip_ratio/region_mean"]) == pytest.approx(float(core.metrics["clipfrac_active"]))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_no_rows_gives_zero(loss_type):
    lp = torch.zeros(0, T, dtype=torch.float64, requires_grad=True)
    loss, metrics = ptrl.grpo_loss(lp, lp.detach(), torch.zeros(0), torch.zeros(0, T, dtype=torch.int64),
                                   plain_args(loss_type=loss_type))
    loss.backward()
    assert float(loss.detach()) == 0.0 and lp.grad.shape == (0, T)
    assert list(metrics) == list(ptrl.METRIC_KEYS_BY_LOSS_TYPE[loss_type])
    if loss_type in CLIP_LOSS_TYPES:
        assert math.isnan(metrics["clip_ratio/low_min"]) and float(metrics["clip_ratio/low_mean"]) == 0.0
    elif loss_type == "cispo":
        assert float(metrics["cispo_clip_ratio"]) == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")
def test_no_host_synchronisation_on_cuda():
    import ppo_ext

    if not ppo_ext.built_with_cuda():
        pytest.skip("ppo_ext was built without its CUDA kernels")
    case = make_case(33)
    dev = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    lp = dev["lp"].clone().requires_grad_(True)
    kl = _avg_kl(case, True).sort().values
    ratio = torch.rand(B, T, device="cuda", dtype=torch.float64) + 0.5
    for loss_type in LOSS_TYPES:
        args = plain_args(loss_type=loss_type, delta=1.5, use_vllm=True, importance_sampling_level="sequence",
                          off_policy_mask_threshold=float(kl[4]))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss, metrics = ptrl.grpo_loss(lp, dev["old"], dev["advantages"], dev["mask"], args,
                                           num_items_in_batch=dev["mask"].sum(), importance_sampling_ratio=ratio,
                                           sampling_per_token_logps=dev["sampling"], entropies=dev["entropies"],
                                           gradient_accumulation_steps=2)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        cpu_lp = case["lp"].clone().requires_grad_(True)
        cpu_loss, cpu_metrics = ptrl.grpo_loss(cpu_lp, case["old"], case["advantages"], case["mask"], args,
                                               num_items_in_batch=case["mask"].sum(),
                                               importance_sampling_ratio=ratio.cpu(),
                                               sampling_per_token_logps=case["sampling"],
                                               entropies=case["entropies"], gradient_accumulation_steps=2)
        cpu_loss.backward()
        torch.testing.assert_close(loss.cpu(), cpu_loss, **TOL64)
        for key in cpu_metrics:
            torch.testing.assert_close(metrics[key].cpu(), cpu_metrics[key], equal_nan=True)
        lp.grad = None
