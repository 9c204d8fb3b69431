"""The train stage (``ftedge train``): ``stage`` (recipe -> adapter in the run), ``model`` (loading per
method, the label-only loss), ``loop`` (steps, eval, checkpoints, resume, progress)."""

from ftedge.train.stage import train_stage

__all__ = ["train_stage"]
