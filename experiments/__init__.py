"""The evidence (EXPERIMENTS.md): each published method claim run through the `dml` command; `python -m
experiments.run` runs them all or by name."""
