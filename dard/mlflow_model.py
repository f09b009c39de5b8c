"""The MLflow pyfunc flavour of a dard model, logged as *models from code*: nothing is pickled.

MLflow stores this file and the dard model file (``artifacts/dard-model.pt``, weights-only
format). ``mlflow.pyfunc.load_model(uri).predict(x)`` serves it: x (N, C, H, W) float32 in
[0, 1] -> logits (N, K). ``dard`` itself never runs this file from a registry: it reads only the
weights file, with ``torch.load(weights_only=True)`` (``dard.registry.load_registered``).
"""
import mlflow
from mlflow.pyfunc import PythonModel


class DardModel(PythonModel):
    def load_context(self, context):
        from dard.models import load_model

        self.model, self.header = load_model(context.artifacts["dard_model"])

    def predict(self, context, model_input, params=None):  # noqa: ARG002
        import numpy as np
        import torch

        with torch.no_grad():
            return self.model(torch.as_tensor(np.asarray(model_input, dtype=np.float32))).numpy()


mlflow.models.set_model(DardModel())
