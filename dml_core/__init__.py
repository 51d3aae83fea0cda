"""dml_core: the pure library behind the pipeline (losses, metrics, data, models). No Prefect, no Ray."""

__version__ = "0.1.0"
