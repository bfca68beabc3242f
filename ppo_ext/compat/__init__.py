"""Drop-in adapters that compute what an RL framework's own policy loss computes, with ppo_ext's kernel.

- ``ppo_ext.compat.verl``: ``compute_policy_loss_<mode>`` (vanilla, gspo, cispo, sapo, gpg, dro, dppo_tv,
  dppo_kl, geo_mean) and ``compute_value_loss`` with the signatures, metric keys and aggregation
  (``global_batch_info``) of verl 0.9's ``core_algos``, and ``register()`` to put the policy losses into
  verl's policy-loss registry.
- ``ppo_ext.compat.roll``: ``compute_policy_loss`` with ROLL's config vocabulary (``pg_clip``,
  ``use_pg_clip_range``, ``dual_clip_loss``, ``importance_sampling``, ``loss_agg_mode``) and the
  metric keys of ROLL's actor worker.
- ``ppo_ext.compat.trl``: ``grpo_loss``, the loss of TRL's ``GRPOTrainer._compute_loss`` for a
  ``GRPOConfig``, and ``PPOExtGRPOMixin`` / ``PPOExtGRPOTrainer`` that swap it into the trainer.
- ``ppo_ext.compat.openrlhf``: ``PolicyLoss`` and ``ValueLoss``, drop-ins for OpenRLHF's
  ``openrlhf.models.loss`` classes.

None imports its framework: they run without it installed (``PPOExtGRPOTrainer`` is built from
``trl.GRPOTrainer`` on first use). The tests compare them with the frameworks' own released code.
"""

__all__ = ["verl", "roll", "trl", "openrlhf"]
