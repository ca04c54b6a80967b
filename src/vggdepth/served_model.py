"""The MLflow model of a run, as code (MLflow's "models from code"): what `mlflow.pyfunc.load_model` and `mlflow
models serve` run to build it, so that loading the model unpickles nothing (vggdepth.serving)."""

import mlflow.models

from vggdepth.serving import ImageClassifier

mlflow.models.set_model(ImageClassifier())
