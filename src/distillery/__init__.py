"""distillery: dataset distillation (MTT, TESLA, RaT-BPTT) with a shared evaluation protocol."""

__version__ = "0.1.0"
