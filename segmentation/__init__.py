"""FC-HarDNet semantic segmentation: data, models, training with Accelerate, tracking with MLflow, serving."""

__version__ = "0.1.0"
