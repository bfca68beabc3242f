"""Drop-in adapters that compute what an RL framework's own policy loss computes, with ppo_ext's kernel.

- ``ppo_ext.compat.verl``: ``compute_policy_loss_<mode>`` (vanilla, gspo, cispo, sapo, gpg, dro, dppo_tv,
  dppo_kl, geo_mean, kl_cov, clip_cov, bypass_mode) and ``compute_value_loss`` with the signatures, metric keys
  and aggregation (``global_batch_info``) of verl 0.9's ``core_algos``, ``register()`` to put the policy losses
  into verl's policy-loss registry, and ``ppo_loss`` / ``register_actor_loss()``, verl's whole actor loss (the
  KL loss and the entropy bonus too).
- ``ppo_ext.compat.roll``: ``compute_policy_loss`` with ROLL's config vocabulary (``pg_clip``,
  ``use_pg_clip_range``, ``dual_clip_loss``, ``importance_sampling``, ``loss_agg_mode``) and the
  metric keys of ROLL's actor worker.
- ``ppo_ext.compat.trl``: ``grpo_loss``, the loss of TRL's ``GRPOTrainer._compute_loss`` for a
  ``GRPOConfig``, and ``PPOExtGRPOMixin`` / ``PPOExtGRPOTrainer`` that swap it into the trainer.
- ``ppo_ext.compat.openrlhf``: ``PolicyLoss`` and ``ValueLoss``, drop-ins for OpenRLHF's
  ``openrlhf.models.loss`` classes, and ``kl_loss``, its actor's KL loss.

None imports its framework at import time: they run without it installed (``PPOExtGRPOTrainer`` is built from
``trl.GRPOTrainer`` on first use; verl's bypass_mode, ``ppo_loss`` and the ``register`` functions call verl's own
code and import it when called). The tests compare them with the frameworks' own released code.
"""

__all__ = ["verl", "roll", "trl", "openrlhf"]
