"""Drop-in adapters that compute what an RL framework's own policy loss computes, with ppo_ext's kernel.

- ``ppo_ext.compat.verl``: ``compute_policy_loss_vanilla`` and ``compute_policy_loss_gspo`` with the
  signatures, metric keys and aggregation (``global_batch_info``) of verl 0.9's ``core_algos``, and
  ``register()`` to put them into verl's policy-loss registry.
- ``ppo_ext.compat.roll``: ``compute_policy_loss`` with ROLL's config vocabulary (``pg_clip``,
  ``use_pg_clip_range``, ``dual_clip_loss``, ``importance_sampling``, ``loss_agg_mode``) and the
  metric keys of ROLL's actor worker.

Neither imports its framework: they run (and are tested) without verl or ROLL installed.
"""

__all__ = ["verl", "roll"]
