"""logitprobe: see how a language model picks each next token.

Traces (every step's raw and processed distribution, its top candidates, entropy and the
sampled token's probability and rank), teacher-forced scores and engine comparisons, from
llama.cpp (GGUF) and ONNX Runtime (ONNX exports), as pyarrow tables. The numbers are the
``logitprobe`` command line's, value for value: the same settings and seed give the same
tokens.

>>> import logitprobe as lp
>>> m = lp.Model("~/.cache/logitprobe/SmolLM2-135M-Instruct.Q4_1.gguf", threads=2)
>>> run = m.trace("The capital of France is", max_new_tokens=8, seed=1)
>>> run.steps.num_rows
8

See docs/python.md for the whole API.
"""

from ._errors import EngineError, Error, ModelNotFoundError, UsageError
from ._logitprobe import Comparison, Model, Run, Stream, __version__, compare

__all__ = [
    "Comparison",
    "EngineError",
    "Error",
    "Model",
    "ModelNotFoundError",
    "Run",
    "Stream",
    "UsageError",
    "__version__",
    "compare",
]
