"""Models by name: the ConvNet family and the cross-architecture zoo, plus the flat-parameter functional interface."""

from . import convnet, zoo  # noqa: F401  (importing them registers the ConvNet names and the zoo)
from .functional import FunctionalModel
from .registry import create_model, has_batchnorm, init_seeded, list_models, register_model

__all__ = ["FunctionalModel", "create_model", "has_batchnorm", "init_seeded", "list_models", "register_model"]
