"""Models-from-code entry file: MLflow stores this file with each logged model and runs it at load time.

Nothing of ours is pickled: the model is rebuilt from the ``segmentation`` code logged beside it (``code_paths``)
and the package in its ``artifacts`` (see :func:`segmentation.mlops.model_store.log_model_package`).
"""

import mlflow

from segmentation.mlops.serving import SegmentationModel

mlflow.models.set_model(SegmentationModel())
