"""Federated learning on the serverless primitives."""

from strato.fl.app import App, DataInfo, Dataset, TrainContext, load_app
from strato.fl.config import JobConfig, load_job_config

__all__ = ["App", "DataInfo", "Dataset", "JobConfig", "TrainContext", "load_app", "load_job_config"]
