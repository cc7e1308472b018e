"""Exporters: the compressed-tensors checkpoint that transformers loads and vLLM serves.

Installed as ``rqat_sdk.exporters`` (the folder sits at the top of the repository, as the design card lays
it out, but a PyPI package named ``exporters`` exists, so it is never installed under that name).
"""

from rqat_sdk.exporters.compressed_tensors import (
    ExportReport,
    export_checkpoint,
    probe_batch,
    reload_checkpoint,
    save_dense,
)
from rqat_sdk.exporters.formats import checkpoint_format, unsupported_reason

__all__ = [
    "ExportReport",
    "checkpoint_format",
    "export_checkpoint",
    "probe_batch",
    "reload_checkpoint",
    "save_dense",
    "unsupported_reason",
]
