"""CpRec: compressed NextItNet sequential recommenders on the cprec_kernels ops.

Models (``NextItNet``, ``CpRec``, ``PopularityModel``), data (``load_dataset``),
training (``TrainConfig``, ``train``) and the ``cprec`` command line.
"""
from .data import SequenceData, load_dataset
from .models import CpRec, NextItNet, PopularityModel, build_model
from .train import TrainConfig, evaluate, train

__all__ = [
    "CpRec",
    "NextItNet",
    "PopularityModel",
    "SequenceData",
    "TrainConfig",
    "build_model",
    "evaluate",
    "load_dataset",
    "train",
]
__version__ = "0.1.0"
