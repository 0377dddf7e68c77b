"""Per-example clipping engines: the one place their names live, and where users add their own.

An engine turns a batch into Σᵢ clip(∇ℓᵢ, C) over its examples, and says which layers it can clip.
Two ship with dpmedtf:

- ``fast``: layer-wise per-example norms (ghost or instantiated) and a book-keeping clipped sum, with
  no per-example Jacobian (``privacy.clipping``); it clips the layers of the clipping registry.
- ``vectorized``: every example's full gradient by ``tape.jacobian`` (pfor), clipped and summed — the
  method of tensorflow-privacy's vectorized optimizers; any layer but LayerNormalization (on which
  TensorFlow 2.15's pfor corrupts memory), at far higher memory and time.

``register_engine`` adds another (as opacus lets users add grad samplers); the job key
``training.clipping`` and ``make_private(engine=...)`` accept any registered name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from dpmedtf.errors import DpmedtfError

if TYPE_CHECKING:  # TensorFlow is imported when an engine runs: the job config asks for the names alone
    import tensorflow as tf

PerExampleLoss = Callable[["tf.Tensor"], "tf.Tensor"]
"""Model outputs (B, …) → per-example losses (B,)."""


@dataclass(frozen=True, kw_only=True)
class ClippingEngine:
    name: str
    description: str
    """One line for the ledger and certificate: how per-example gradients are bounded."""
    clipped_gradient_sum: Callable
    """``(network, inputs, per_example_loss, clip_norm)`` → (Σᵢ cᵢ∇ℓᵢ per trainable variable, losses (B,))."""
    clips: Callable[["tf.keras.layers.Layer"], bool]
    """Whether the engine can clip this layer's trainable weights per example."""
    supported_layers: Callable[[], tuple[type, ...]] | None = None
    """The layer classes it clips, when it clips only some (named in error messages)."""
    model_problems: Callable[["tf.keras.Model"], list[str]] = lambda model: []
    """Reasons the engine cannot run on this model as a whole (one line each; empty when it can)."""


class UnknownEngineError(DpmedtfError, ValueError):
    """An engine name that no one registered."""


_ENGINES: dict[str, ClippingEngine] = {}


def register_engine(engine: ClippingEngine, *, replace: bool = False) -> ClippingEngine:
    if engine.name in _ENGINES and not replace:
        raise DpmedtfError(f"a clipping engine named {engine.name!r} is already registered; pass replace=True "
                           "to replace it")
    _ENGINES[engine.name] = engine
    return engine


def get_engine(name: str) -> ClippingEngine:
    try:
        return _ENGINES[name]
    except KeyError:
        raise UnknownEngineError(f"no clipping engine {name!r}; choose one of {engine_names()} "
                                 "(or register yours with dpmedtf.privacy.engines.register_engine)") from None


def engine_names() -> tuple[str, ...]:
    return tuple(_ENGINES)


def _fast_sum(network, inputs, per_example_loss, clip_norm):
    # Imported on use: tensorflow-privacy's registry costs ~1.5 s and validation only asks ``clips``.
    from dpmedtf.privacy.clipping import fast_clipped_gradient_sum

    clipped = fast_clipped_gradient_sum(network, inputs, per_example_loss, clip_norm)
    return list(clipped.sums), clipped.per_example_losses


def _fast_clips(layer) -> bool:
    from dpmedtf.privacy.clipping.registry import is_supported

    return is_supported(layer)


def _fast_model_problems(model) -> list[str]:
    # The engine walks the model's layer graph (tensorflow-privacy's model_forward_pass), which only a
    # functional model (Sequential included) has.
    from keras.src.engine.functional import Functional

    if isinstance(model, Functional):
        return []
    return [f"model '{model.name}' is a subclassed Keras model: the fast engine follows a functional layer graph; "
            "build it with the functional API or Sequential (with an input shape), or use the vectorized engine"]


def _fast_layers() -> tuple[type, ...]:
    from dpmedtf.privacy.clipping.registry import supported_layer_types

    return supported_layer_types()


def vectorized_clipped_gradient_sum(network, inputs, per_example_loss: PerExampleLoss, clip_norm):
    """Σᵢ clip(∇ℓᵢ, C) from each example's whole gradient (``tape.jacobian`` vectorised by pfor)."""
    import tensorflow as tf

    from dpmedtf.privacy.clipping.norms import clip_factors, squared_norms_of

    variables = network.trainable_variables
    with tf.GradientTape() as tape:
        losses = per_example_loss(network(inputs, training=True))
    per_example = tape.jacobian(losses, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO,
                                experimental_use_pfor=True)
    squared = tf.add_n([squared_norms_of(g) for g in per_example])  # float64: no rounding lets a norm shrink
    sums = [tf.tensordot(clip_factors(squared, clip_norm, g.dtype), g, axes=1) for g in per_example]
    return sums, losses


def _vectorized_clips(layer) -> bool:
    # TensorFlow 2.15's pfor corrupts memory (double free, segfault) on LayerNormalization's per-example
    # Jacobian inside the step's chunk loop: refused here, clipped by the fast engine instead.
    import tensorflow as tf

    return not isinstance(layer, tf.keras.layers.LayerNormalization)


FAST = register_engine(ClippingEngine(
    name="fast", clipped_gradient_sum=_fast_sum, clips=_fast_clips, supported_layers=_fast_layers,
    model_problems=_fast_model_problems,
    description="dpmedtf fast clipping: per-layer per-example norms (ghost or instantiated), book-keeping clipped sum"))
VECTORIZED = register_engine(ClippingEngine(
    name="vectorized", clipped_gradient_sum=vectorized_clipped_gradient_sum, clips=_vectorized_clips,
    description="vectorized per-example gradients (tape.jacobian with pfor), each clipped, then summed"))
