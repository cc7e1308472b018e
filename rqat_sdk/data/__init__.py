"""The dataset layer shared by calibration, training and evaluation."""

from rqat_sdk.data.sources import DatasetInput, describe_source, load_examples, normalise_row
from rqat_sdk.data.tokenize import IGNORE_INDEX, tokenize_examples

__all__ = ["IGNORE_INDEX", "DatasetInput", "describe_source", "load_examples", "normalise_row", "tokenize_examples"]
