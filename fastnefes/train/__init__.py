"""Training pipelines: progressive NeFeS training of a feature field into a run directory."""

from fastnefes.train.config import STAGES, TrainConfig
from fastnefes.train.run import load_run, train
from fastnefes.train.trainer import TrainingDiverged

__all__ = ["STAGES", "TrainConfig", "TrainingDiverged", "load_run", "train"]
