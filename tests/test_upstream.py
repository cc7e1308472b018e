"""Private upstream internals: each adapter refuses another version than the one it was verified against, and
the internals it touches are still there in the pinned versions (what they do is tested where they are used:
tests/test_ptq.py, tests/test_grpo.py)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from rqat_sdk import upstream
from rqat_sdk.errors import UpstreamVersionError
from rqat_sdk.modifiers.ptq import llmcompressor_adapter
from rqat_sdk.modifiers.rl import trl_adapter

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
VERIFIED = {
    "llmcompressor": llmcompressor_adapter.VERIFIED_VERSION,
    "trl": trl_adapter.VERIFIED_VERSION,
    "accelerate": trl_adapter.VERIFIED_ACCELERATE,
}


def test_each_adapter_names_the_version_pyproject_pins():
    """Moving a pin means checking the adapter's private contacts again: this fails until its version moves too."""
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    for package, verified in VERIFIED.items():
        pins = [re.fullmatch(rf"{package}==(\S+)", d) for d in dependencies if d.startswith(package)]
        assert [pin.group(1) if pin else None for pin in pins] == [verified], f"pyproject.toml must pin {package}"


def test_another_version_is_refused_with_what_to_check(monkeypatch):
    monkeypatch.setattr(upstream.metadata, "version", lambda package: "99.0")
    with pytest.raises(UpstreamVersionError, match=r"llmcompressor_adapter\.py relies on private internals of "
                                                   r"llmcompressor 0\.14\.0\.1, but llmcompressor 99\.0 is installed"):
        llmcompressor_adapter.quantize_rtn(None, None, None, None)  # refused before it reads any argument
    with pytest.raises(UpstreamVersionError, match=r"trl_adapter\.py \(sync_quantized_weights\) relies on private "
                                                   r"internals of trl 1\.16\.0, but trl 99\.0 is installed"):
        trl_adapter.sync_quantized_weights(None, None)
    with pytest.raises(UpstreamVersionError, match=r"\(remove_mixed_precision_wrapper\) relies on private internals "
                                                   r"of accelerate 1\.15\.0"):
        trl_adapter.remove_mixed_precision_wrapper(None)


def test_the_private_internals_are_where_the_adapters_expect_them():
    from llmcompressor.modifiers.transform import SpinQuantModifier
    from llmcompressor.pipelines.cache import IntermediatesCache
    from trl.generation.vllm_generation import VLLMGeneration

    assert callable(SpinQuantModifier.__dict__["_center_embeddings"])
    assert callable(IntermediatesCache.__dict__["pin_memory"])
    assert callable(VLLMGeneration.__dict__["_iter_named_params"])

