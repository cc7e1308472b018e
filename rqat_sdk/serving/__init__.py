"""Serving with vLLM: its own environment, and the check that it serves what transformers computes."""

from rqat_sdk.serving.check import ServeReport, serve_check

__all__ = ["ServeReport", "serve_check"]
