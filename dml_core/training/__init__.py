"""The training library (no Ray): building the run's objects, one step, state save/load, BCT prototypes,
the metrics log. `tasks/train.py` drives these from Ray Train workers."""
