"""The dataset layer shared by calibration, training and evaluation."""

from rqat_sdk.data.sources import DatasetInput, describe_source, load_examples, normalise_row
from rqat_sdk.data.tokenize import IGNORE_INDEX, check_trainable, check_trainable_tokens, tokenize_examples

__all__ = [
    "IGNORE_INDEX", "DatasetInput", "check_trainable", "check_trainable_tokens", "describe_source", "load_examples",
    "normalise_row", "tokenize_examples",
]
