"""reprogram: black-box adversarial reprogramming of frozen image classifiers.

Learn one input-agnostic pixel program and a label mapping that turn a frozen source
classifier (local, or behind an Open Inference Protocol API) into a classifier for your task.
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting halve torch's CPU throughput when a client and a
# server (or any two processes) share the cores; passive waiting costs nothing when alone.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "BudgetExhausted",
    "ConfigError",
    "DataError",
    "FitConfig",
    "FitResult",
    "HttpOracle",
    "LocalOracle",
    "ModelError",
    "Oracle",
    "OracleError",
    "Prompt",
    "ReprogramError",
    "Reprogrammer",
    "TargetDataset",
    "__version__",
    "fit",
    "load_dataset",
    "load_model",
    "load_prompt",
    "recommended_config",
    "save_prompt",
]

from reprogram.artifact import Prompt, load_prompt, save_prompt
from reprogram.config import FitConfig, recommended_config
from reprogram.data import TargetDataset, load_dataset
from reprogram.errors import (
    ArtifactError,
    BudgetExhausted,
    ConfigError,
    DataError,
    ModelError,
    OracleError,
    ReprogramError,
)
from reprogram.fit import FitResult, fit
from reprogram.http_oracle import HttpOracle
from reprogram.oracles import LocalOracle, Oracle
from reprogram.pipeline import Reprogrammer
from reprogram.zoo.registry import load_model
