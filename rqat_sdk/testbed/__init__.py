"""Models the project builds itself, offline: tiny test models now, the reasoning testbed later."""

from rqat_sdk.testbed.tiny import build_model, build_tokenizer, write_tiny_model

__all__ = ["build_model", "build_tokenizer", "write_tiny_model"]
