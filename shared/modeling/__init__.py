"""Model building, artifact I/O and preprocessing: the torch code both API and worker need."""

from shared.modeling.artifact import load_model_artifact, save_model_artifact
from shared.modeling.build import WeightsUnavailable, build_model, classifier_parameters
from shared.modeling.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, resize_size_for

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "WeightsUnavailable",
    "build_model",
    "classifier_parameters",
    "eval_transform",
    "load_model_artifact",
    "resize_size_for",
    "save_model_artifact",
]
