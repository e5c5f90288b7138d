"""The tier between the ops and the model: modules and module-level functions that hold a plain forward (the
modules called in order) beside CPU-blocked forwards and reversible backwards, behind one predicate
(``fast_path.plain_modules``)."""

from .fast_path import CPU_BLOCK_ROWS, plain_modules, unhooked
from .feed_forward import ChunkReformerFeedForward, ReformerFeedForwardDense, ReformerFeedForwardOutput
from .lm_head import ReformerOnlyLMHead, final_layer_norm

__all__ = [
    "CPU_BLOCK_ROWS",
    "ChunkReformerFeedForward",
    "ReformerFeedForwardDense",
    "ReformerFeedForwardOutput",
    "ReformerOnlyLMHead",
    "final_layer_norm",
    "plain_modules",
    "unhooked",
]
