"""ppo_ext.compat.verl.ppo_loss, the actor's whole loss (the policy loss, the KL loss to the reference and the
entropy bonus), against verl 0.9.1's own ``ppo_loss`` (verl/workers/utils/losses.py), both run on the same verl
micro-batch: a real TensorDict in verl's layout (left-padded prompts, right-padded responses, the model's log-probs
and entropies flat over every sequence's tokens, as verl's engine hands them), verl's own padding helpers and
Metric, verl's ActorConfig. The loss, the gradients w.r.t. the model's log-probs and entropies, and every metric.
"""

import sys

import pytest
import torch

import frameworks
from ppo_ext.compat import verl as pv

MODES = ("vanilla", "gspo", "cispo", "sapo", "gpg", "dro", "dppo_tv", "dppo_kl", "geo_mean", "kl_cov", "clip_cov")
KL_TYPES = ("low_var_kl", "kl", "abs", "mse", "k3+", "k1+")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum", "seq-mean-token-sum-norm")


@pytest.fixture(scope="module")
def verl():
    ns = frameworks.load_or_skip(frameworks.verl_actor)
    base = frameworks.verl()
    return ns, base


@pytest.fixture
def adapter_uses_verl(verl, monkeypatch):
    """ppo_ext's ppo_loss imports verl's padding, Metric and ppo_loss from the installed verl (whose __init__ needs
    ray): here the very modules verl's own ppo_loss runs with."""
    ns, _ = verl
    monkeypatch.setattr(pv, "_verl_actor_modules", lambda: ns.modules)


def micro_batch(ns, seed, *, B=6, P=5, R=11, empty_row=True, rollout_is=False, info=(1, None, None),
                zero_probability=False):
    """A verl micro-batch (TensorDict) and the model's output: flat log-probs and entropies over every sequence's
    tokens (prompt and response), whose response part (left-shifted by one, as verl's no_padding_2_padding reads
    it) is the (B, R) leaves returned for the gradients."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    prompt_lens = torch.randint(1, P + 1, (B,), generator=g)
    response_lens = torch.randint(1, R + 1, (B,), generator=g)
    if empty_row:
        response_lens[1] = 0
    positions = torch.arange(P + R)
    attention = ((positions[None] >= P - prompt_lens[:, None]) & (positions[None] < P)) | \
        ((positions[None] >= P) & (positions[None] < P + response_lens[:, None]))
    response_mask = attention[:, P:].to(torch.int64)
    lp = -3 * torch.rand(B, R, generator=g, dtype=f64)
    if zero_probability:  # a sampled token the policy now gives probability 0 (verl's k3 is 10 there)
        lp[0, 0] = -torch.inf
    lp.requires_grad_(True)
    entropy = (2 * torch.rand(B, R, generator=g, dtype=f64)).requires_grad_(True)
    old = lp.detach() + 0.3 * torch.randn(B, R, generator=g, dtype=f64) + 0.2 * torch.randn(B, 1, generator=g, dtype=f64)
    ref = lp.detach() + 0.6 * torch.randn(B, R, generator=g, dtype=f64)
    ref[0, :3] = lp.detach()[0, :3] + 4.0  # k = -4: k3 = e^4 - 5 ~ 50, beyond verl's clamp at 10
    adv = torch.randn(B, 1, generator=g, dtype=f64).expand(B, R).clone()
    if zero_probability:  # (the rollout's and the reference's probabilities were not 0)
        old[0, 0], ref[0, 0] = -2.0, -1.5

    def flat(per_response):  # every sequence's tokens; the response's values where no_padding_2_padding reads them
        pieces = []
        for i in range(B):
            n_seq = int(prompt_lens[i] + response_lens[i])
            r = int(response_lens[i])
            filler = torch.randn(n_seq, generator=g, dtype=f64)
            pieces += [filler[:n_seq - r - 1], per_response[i, :r], filler[n_seq - 1:]]
        return torch.cat(pieces)

    fields = dict(prompts=torch.randint(0, 100, (B, P), generator=g), responses=torch.randint(0, 100, (B, R), generator=g),
                  attention_mask=attention.to(torch.int64), response_mask=response_mask, old_log_probs=old,
                  advantages=adv, ref_log_prob=ref)
    if rollout_is:
        fields["rollout_is_weights"] = torch.rand(B, R, generator=g, dtype=f64) * 2
    data = ns.TensorDict(fields, batch_size=[B])
    dp_size, batch_num_tokens, global_batch_size = info
    ns.tu.assign_non_tensor(data, dp_size=dp_size, batch_num_tokens=batch_num_tokens,
                            global_batch_size=global_batch_size)
    return data, {"log_probs": flat(lp), "entropy": flat(entropy)}, (lp, entropy)


def actor_config(base, mode, rollout_correction=None, **fields):
    """verl's ActorConfig of loss mode ``mode``; ``rollout_correction``: RolloutCorrectionConfig fields (bypass_mode)."""
    options = dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, tau_pos=1.0,
                   tau_neg=1.05)
    policy_loss_type = type(base.actor_config().policy_loss)
    correction = {} if rollout_correction is None else dict(
        rollout_correction=type(policy_loss_type().rollout_correction)(**rollout_correction))
    policy_loss = policy_loss_type(loss_mode=mode, dro_beta=0.3, **correction)
    return base.actor_config(policy_loss=policy_loss, **{**options, **fields})


def run(fn, ns, base, mode, seed, batch_kw=None, **fields):
    """fn (verl's ppo_loss or ppo_ext's) on a fresh micro-batch: its loss, metrics (aggregated values) and the
    gradients w.r.t. the response log-probs and entropies."""
    data, output, (lp, entropy) = micro_batch(ns, seed, **(batch_kw or {}))
    loss, metrics = fn(actor_config(base, mode, **fields), output, data)
    loss.backward()
    values = {k: (v.aggregate() if isinstance(v, ns.Metric) else v) for k, v in metrics.items()}
    return loss.detach(), values, lp.grad, entropy.grad


def assert_same(ours, theirs, what):
    loss, metrics, lp_grad, h_grad = ours
    ref_loss, ref_metrics, ref_lp_grad, ref_h_grad = theirs
    torch.testing.assert_close(loss.double(), ref_loss.double(), rtol=1e-6, atol=1e-9, msg=lambda m: f"{what}: loss\n{m}")
    assert list(metrics) == list(ref_metrics), f"{what}: keys {list(metrics)}, verl's {list(ref_metrics)}"
    for k, v in ref_metrics.items():
        assert float(metrics[k]) == pytest.approx(float(v), rel=1e-5, abs=1e-7), f"{what}: {k}"
    for name, a, b in (("log_probs", lp_grad, ref_lp_grad), ("entropy", h_grad, ref_h_grad)):
        assert (a is None) == (b is None), f"{what}: gradient w.r.t. {name}"
        if b is not None:
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-9,
                                       msg=lambda m: f"{what}: gradient w.r.t. {name}\n{m}")


def compare(verl, mode, seed, batch_kw=None, **fields):
    ns, base = verl
    torch.manual_seed(seed)  # (clip_cov draws its tokens from the default generator: the same draw for both)
    theirs = run(ns.ppo_loss, ns, base, mode, seed, batch_kw, **fields)
    torch.manual_seed(seed)
    ours = run(pv.ppo_loss, ns, base, mode, seed, batch_kw, **fields)
    assert_same(ours, theirs, f"{mode} {fields} {batch_kw}")
    return theirs


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_with_kl_and_entropy(verl, adapter_uses_verl, mode):
    theirs = compare(verl, mode, 1, use_kl_loss=True, kl_loss_type="low_var_kl", kl_loss_coef=0.05,
                     entropy_coeff=0.01, loss_agg_mode="seq-mean-token-mean")
    assert {"actor/pg_loss", "actor/entropy_loss", "kl_loss", "kl_coef"} <= set(theirs[1])
    assert theirs[3] is not None and theirs[3].abs().sum() > 0  # the entropy got its gradient


@pytest.mark.parametrize("loss_type", ["ppo_clip", "reinforce"])
def test_bypass_mode(verl, adapter_uses_verl, monkeypatch, loss_type):
    """bypass_mode (old_log_probs are the rollout's): verl's rollout_corr_helper's weights, mask and metrics."""
    _, base = verl
    monkeypatch.setitem(sys.modules, "verl.trainer.ppo.rollout_corr_helper", base.rollout_corr_helper)
    correction = dict(bypass_mode=True, loss_type=loss_type, rollout_is="token", rollout_is_threshold=1.5,
                      rollout_rs="token_k1", rollout_rs_threshold="0.6_1.6")
    theirs = compare(verl, "bypass_mode", 3, rollout_correction=correction, use_kl_loss=True, kl_loss_coef=0.05,
                     entropy_coeff=0.01)
    assert theirs[1]["rollout_corr/rollout_rs_masked_fraction"] > 0


@pytest.mark.parametrize("kl_type", KL_TYPES)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_kl_types_and_aggregations(verl, adapter_uses_verl, kl_type, agg):
    compare(verl, "vanilla", 2, use_kl_loss=True, kl_loss_type=kl_type, kl_loss_coef=0.1, entropy_coeff=0.0,
            loss_agg_mode=agg)


@pytest.mark.parametrize("info", [(2, 300, 20), (4, 123.0, 9)], ids=["dp2", "dp4"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_global_batch_info(verl, adapter_uses_verl, agg, info):
    """Data-parallel normalisers and the dp_size factor (metrics aggregated as SUM, as verl)."""
    compare(verl, "vanilla", 3, batch_kw=dict(info=info, rollout_is=True), use_kl_loss=True, kl_loss_coef=0.02,
            entropy_coeff=0.003, loss_agg_mode=agg)
    compare(verl, "sapo", 4, batch_kw=dict(info=info), use_kl_loss=True, kl_loss_coef=0.02, loss_agg_mode=agg)


def test_a_token_of_probability_zero(verl, adapter_uses_verl):
    """lp = -inf at a valid token: verl's k3 is 10 there with gradient 0, its ratio exp(-20); finite, as ours."""
    theirs = compare(verl, "vanilla", 10, batch_kw=dict(zero_probability=True, empty_row=False), use_kl_loss=True,
                     kl_loss_coef=0.1, entropy_coeff=0.01)
    assert torch.isfinite(theirs[0]) and torch.isfinite(theirs[2]).all()


def test_without_kl_or_entropy(verl, adapter_uses_verl):
    ns, base = verl
    compare(verl, "vanilla", 5, use_kl_loss=False, entropy_coeff=0.0)
    # no entropy from the model: no entropy loss, no gradient to it
    data, output, _ = micro_batch(ns, 6)
    del output["entropy"]
    _, metrics = pv.ppo_loss(actor_config(base, "vanilla"), output, data)
    assert "actor/entropy_loss" not in metrics


def test_ppo_ext_mode_names_and_unknown_modes(verl, adapter_uses_verl, monkeypatch):
    """ppo_ext_<mode> (the names register() gives verl) is the mode; a mode the adapter does not cover (one a user
    registered in verl) goes to verl's own ppo_loss, whole."""
    ns, base = verl
    theirs = run(ns.ppo_loss, ns, base, "cispo", 7, use_kl_loss=True, kl_loss_coef=0.1)
    ours = run(pv.ppo_loss, ns, base, "ppo_ext_cispo", 7, use_kl_loss=True, kl_loss_coef=0.1)
    assert_same(ours, theirs, "ppo_ext_cispo")
    calls = []
    padding, metric, losses = ns.modules
    fake_losses = type("losses", (), {"ppo_loss": staticmethod(lambda *a: calls.append(a) or ("verl's", {}))})
    monkeypatch.setattr(pv, "_verl_actor_modules", lambda: (padding, metric, fake_losses))
    data, output, _ = micro_batch(ns, 8)
    assert pv.ppo_loss(actor_config(base, "my_loss"), output, data) == ("verl's", {}) and len(calls) == 1


def test_register_actor_loss(monkeypatch):
    import sys
    import types
    workers = types.ModuleType("verl.workers.engine_workers")
    workers.ppo_loss = verl_own = object()
    package = types.ModuleType("verl.workers")
    package.engine_workers = workers
    monkeypatch.setitem(sys.modules, "verl", types.ModuleType("verl"))
    monkeypatch.setitem(sys.modules, "verl.workers", package)
    monkeypatch.setitem(sys.modules, "verl.workers.engine_workers", workers)
    assert pv.register_actor_loss() is verl_own
    assert workers.ppo_loss is pv.ppo_loss
