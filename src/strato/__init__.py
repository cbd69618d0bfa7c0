"""Strato: serverless federated learning and serverless distributed inference."""

from strato.codec import Encoded, decode, encode
from strato.errors import StratoError
from strato.params import Layout, Params

__all__ = ["Encoded", "Layout", "Params", "StratoError", "decode", "encode"]
__version__ = "0.1.0"
