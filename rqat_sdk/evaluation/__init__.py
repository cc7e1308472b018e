"""Reasoning evaluation: pass@1 over sampled answers, for any model or checkpoint the SDK produces."""

from rqat_sdk.data.answers import extract_boxed, math_equal, score_response
from rqat_sdk.evaluation.benchmarks import HUB_BENCHMARKS, Problem, load_benchmark
from rqat_sdk.evaluation.harness import EvalReport, evaluate, markdown_table, plot, sample_std
from rqat_sdk.evaluation.perplexity import perplexity

__all__ = [
    "HUB_BENCHMARKS",
    "EvalReport",
    "Problem",
    "evaluate",
    "extract_boxed",
    "load_benchmark",
    "markdown_table",
    "math_equal",
    "perplexity",
    "plot",
    "sample_std",
    "score_response",
]
