"""Models-from-code entry file: MLflow stores this file with each logged model and runs it at load time.

Nothing of ours is pickled: the model is rebuilt from the ``segmentation`` code logged beside it (``code_paths``)
and the package in its ``artifacts`` (see ``segmentation.export.log_pytorch_model``).
"""

import mlflow

from segmentation.serving import SegmentationModel

mlflow.models.set_model(SegmentationModel())
