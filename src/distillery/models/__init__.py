"""Models by name: the ConvNet family and the cross-architecture zoo, plus the flat-parameter functional interface."""

from . import convnet  # noqa: F401  (registers the ConvNet names)
from .functional import FunctionalModel
from .registry import create_model, has_batchnorm, init_seeded, list_models, register_model

try:  # the cross-architecture zoo registers AlexNet, VGG11, ResNet18, ...
    from . import zoo  # noqa: F401
except ImportError:  # pragma: no cover - only while zoo.py is being written
    pass

__all__ = ["FunctionalModel", "create_model", "has_batchnorm", "init_seeded", "list_models", "register_model"]
