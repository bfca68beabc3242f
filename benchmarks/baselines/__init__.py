"""One copy of each framework's eager code that ppo_ext is measured (and, for verl, tested) against."""
