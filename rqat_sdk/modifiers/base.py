"""The modifier contract: a small Pydantic config with a three-step lifecycle.

A modifier is both the YAML node that configures it and the code that applies it, as in llm-compressor.
:func:`rqat_sdk.session.engine.run_stage` drives one stage's modifiers and is the only caller of the
lifecycle's methods::

    for m in stage.modifiers: m.initialize(state)   # every check first: a stage that cannot run fails
                                                     # before it changes the model
    for m in stage.modifiers:
        m.apply(state)                               # change state.model (quantize, train, ...)
        m.finalize(state)                            # always, also when apply raised

- ``initialize`` checks preconditions against ``state.model`` as the stage found it (shapes, architecture),
  and must not change the model: a later modifier of the stage runs its checks before an earlier one's
  ``apply``, and a failed check leaves the model exactly as it was.
- ``apply`` does the work. What it attaches for the duration (a trainable forward, float32 weights,
  gradient checkpointing) it records on the modifier so that ``finalize`` can undo it.
- ``finalize`` releases and restores what ``apply`` attached, and runs whether ``apply`` returned or raised,
  so it must cope with an ``apply`` that stopped part-way (or before attaching anything). After it the
  model is usable with its own forward, even when the stage failed: a model given to ``oneshot`` in memory
  keeps the work of the modifiers that ran, never a half-attached training state.

Before the first stage, once the model has loaded, the session asks every modifier of every stage for
``model_problems(config, at)``: what it could never do with this model (a GRPO stage's preallocated KV cache
on sliding-window layers), so that a run refuses it before hours of earlier stages.

A stage stops at the first modifier that fails; the modifiers after it are neither applied nor finalized.
Everything a modifier needs comes from the :class:`~rqat_sdk.session.state.SessionState` it is given;
what little state is process-wide is listed in docs/architecture.md (Sessions and state).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from rqat_sdk.fields import StrictModel

if TYPE_CHECKING:
    from rqat_sdk.recipe.recipe import Position, Recipe
    from rqat_sdk.session.state import SessionState


class Modifier(StrictModel):
    """Base class of every recipe modifier; subclasses add a ``type: Literal[...]`` discriminator."""

    type: str

    quantizes: ClassVar[bool] = False
    """True for modifiers that attach the recipe's scheme to the model (a recipe needs exactly one)."""
    needs_data: ClassVar[bool] = False
    """True when :meth:`apply` reads the stage's dataset (calibration or training data)."""
    trains_quantized: ClassVar[bool] = False
    """True for modifiers that train the quantized model, so they must come after the quantizing one."""
    trains_on_responses: ClassVar[bool] = False
    """True when :meth:`apply` learns from the data's responses, so data without any is refused up front."""

    def check(self, recipe: Recipe, at: Position) -> list[str]:
        """Problems with this modifier's place in ``recipe`` (it stands ``at`` there), found without a model."""
        quantizer = recipe.quantizer_position()
        if self.trains_quantized and quantizer is not None and at < quantizer:
            return [f"{at.path}: {self.type} trains the quantized model; put it after the quantizing modifier at "
                    f"{quantizer.path}"]
        return []

    def warnings(self, recipe: Recipe, at: Position) -> list[str]:
        """Legal but doubtful choices (``rqat validate`` prints them; a run logs them)."""
        return []

    def wants_original_model(self) -> bool:
        """True when :meth:`apply` needs the full-precision model the run started from (as a teacher)."""
        return False

    def model_problems(self, config: Any, at: Position) -> list[str]:
        """What this modifier cannot do with a model of ``config``, each as ``"field: message"``: checked for
        every stage once the model loads, before the first stage runs."""
        return []

    def initialize(self, state: SessionState) -> None:
        """Check preconditions against ``state.model`` as the stage found it, without changing it."""

    @abstractmethod
    def apply(self, state: SessionState) -> None:
        """Do the modifier's work on ``state.model``."""

    def finalize(self, state: SessionState) -> None:
        """Undo what :meth:`apply` attached for its duration; also runs after an ``apply`` that raised."""

