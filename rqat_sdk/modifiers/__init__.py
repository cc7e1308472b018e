"""Recipe modifiers: the lifecycle contract (:mod:`~rqat_sdk.modifiers.base`), the fake-quantized layers that
the training phases share (:mod:`~rqat_sdk.modifiers.layers`), and one subpackage per phase: ``ptq``
(initialisation), ``qat`` and ``rl`` (training). The phases do not import each other; the recipe's
:data:`~rqat_sdk.recipe.recipe.AnyModifier` gathers them.
"""

from rqat_sdk.modifiers.base import Modifier

__all__ = ["Modifier"]
