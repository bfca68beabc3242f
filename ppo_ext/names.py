"""The names of ppo_ext's options, metrics and counts, in one place (docs/SPEC.md).

Everything that spells a mode, a metric or a count uses these tuples, and reads ``counts`` (and the raw
op's metrics tensor) by name through ``COUNT_INDEX`` (``METRIC_INDEX``), never by a position typed by
hand. The orders are those of the kernels' outputs (csrc/checks.cpp parses the modes, and lists them in
this order when it refuses one). ``ppo_ext.reference`` keeps its own copy on purpose (it imports nothing
but torch); tests/test_hygiene.py checks that the two, and the C++ op, agree.

This module imports nothing, so anything may import it.
"""

# The values of ``loss_agg_mode``.
LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

# The values of ``loss_type``: the loss families (docs/SPEC.md "Loss families").
LOSS_TYPES = ("vanilla", "cispo", "sapo", "gpg", "dro", "dppo_tv", "dppo_kl", "geo_mean", "vespo", "value")

# The values of ``importance_sampling``: the level of the ratio (token; sequence, the gradient through the
# mean; sequence value with a per-token gradient, GSPO-token).
IMPORTANCE_SAMPLING_LEVELS = ("token", "seq", "seq-token")

# The keys of ``PolicyLossOutput.metrics``, in the order of the op's float32 metrics tensor.
METRIC_NAMES = (
    "clipfrac",
    "clipfrac_low",
    "clipfrac_high",
    "clipfrac_active",
    "dual_clipfrac",
    "approx_kl",
    "ratio_mean",
    "ratio_min",
    "ratio_max",
    "rollout_weight_mean",
    "rollout_weight_min",
    "rollout_weight_max",
    "rollout_filtered_frac",
    "kl",
    "kl_loss",
)

# The entries of ``PolicyLossOutput.counts`` (int64), in order.
COUNT_NAMES = ("valid_tokens", "valid_seqs", "clipped_low", "clipped_high", "clipped_active", "dual_clipped",
               "rollout_filtered_tokens", "rollout_filtered_seqs")

# The values of ``rollout_is`` (the unit of the rollout correction), ``rollout_is_mode`` and
# ``rollout_is_mask_weight`` (docs/SPEC.md "Rollout correction").
ROLLOUT_IS_LEVELS = ("none", "token", "seq", "seq-mean")
ROLLOUT_IS_MODES = ("truncate", "mask")
ROLLOUT_IS_MASK_WEIGHTS = ("unit", "token")

# The values of ``kl_estimator`` (verl's kl_penalty names; each may also end in "+": the value with k2's gradient)
# (docs/SPEC.md "KL to a reference policy").
KL_ESTIMATORS = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")

# Positions by name: ``counts[COUNT_INDEX["valid_tokens"]]``.
METRIC_INDEX = {name: i for i, name in enumerate(METRIC_NAMES)}
COUNT_INDEX = {name: i for i, name in enumerate(COUNT_NAMES)}

__all__ = ["KL_ESTIMATORS", "ROLLOUT_IS_LEVELS", "ROLLOUT_IS_MODES", "ROLLOUT_IS_MASK_WEIGHTS", "LOSS_TYPES", "LOSS_AGG_MODES", "IMPORTANCE_SAMPLING_LEVELS", "METRIC_NAMES", "COUNT_NAMES", "METRIC_INDEX",
           "COUNT_INDEX"]
