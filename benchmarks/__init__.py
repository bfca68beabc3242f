"""The benchmarks (run as scripts: python benchmarks/bench_*.py), their shared harness, and the frameworks' eager
code they compare ppo_ext with (baselines/: the frameworks' released losses, loaded by tests/frameworks.py)."""
