"""kd-mlflow: knowledge distillation for image classification, tracked in MLflow."""

__version__ = "0.1.0"
