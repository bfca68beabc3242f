"""The end-to-end example (examples/grpo_sort_digits.py) runs, learns, and gives the same numbers with
ppo_ext, with the eager reference and from the hidden states for its first steps (same seed, same samples)."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("grpo_sort_digits",
                                               os.path.join(ROOT, "examples", "grpo_sort_digits.py"))
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)


def test_ppo_ext_and_eager_reference_agree():
    runs = {loss: example.train(example.Config(steps=3, loss=loss), quiet=True) for loss in ("ppo_ext", "eager")}
    a, b = runs["ppo_ext"], runs["eager"]
    assert a.reward == b.reward  # the same samples, step after step
    assert a.clipfrac == b.clipfrac
    assert a.clipfrac[1] > 0  # several PPO updates per batch: the ratio moves away from 1 and clips
    for key in ("loss", "approx_kl"):
        assert getattr(a, key) == pytest.approx(getattr(b, key), rel=1e-5, abs=1e-7), key
    diff = example.compare(a, b)
    assert diff["reward"] == 0 and diff["loss"] < 1e-6


def test_loss_from_hidden_states_agrees():
    """--loss hidden (ppo_ext.policy_loss_from_hidden on the transformer's hidden states and its head, no logits)
    trains as --loss ppo_ext does: the same samples, the same losses within float32 rounding."""
    runs = {loss: example.train(example.Config(steps=3, loss=loss), quiet=True) for loss in ("ppo_ext", "hidden")}
    a, b = runs["ppo_ext"], runs["hidden"]
    assert a.reward == b.reward and a.clipfrac == b.clipfrac
    assert a.clipfrac[1] > 0
    for key in ("loss", "approx_kl"):
        assert getattr(b, key) == pytest.approx(getattr(a, key), rel=1e-5, abs=1e-7), key


def test_it_learns():
    """From a random policy (about 0.1 of the digits in place) to about 0.4 in 25 steps."""
    h = example.train(example.Config(steps=25), quiet=True)
    assert h.reward[0] < 0.15
    assert sum(h.reward[-5:]) / 5 > 0.25, h.reward


def test_command_line(tmp_path, capsys):
    plot = importlib.util.find_spec("matplotlib") is not None
    args = ["--steps", "2", "--quiet", "--out-dir", str(tmp_path)] + ([] if plot else ["--no-plot"])
    example.main(args)
    out = capsys.readouterr().out
    assert "reward (moving average" in out
    saved = json.load(open(tmp_path / "grpo_sort_digits_ppo_ext.json"))
    assert len(saved["history"]["ppo_ext"]["reward"]) == 2
    if plot:
        assert (tmp_path / "grpo_sort_digits_ppo_ext.png").stat().st_size > 1000
