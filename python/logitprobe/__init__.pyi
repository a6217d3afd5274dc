"""logitprobe: see how a language model picks each next token (type stubs).

Traces, teacher-forced scores and engine comparisons from llama.cpp (GGUF) and ONNX Runtime
(ONNX exports), as pyarrow tables; the numbers are the ``logitprobe`` command line's, value
for value. Every call releases the GIL while the engine works; Ctrl-C interrupts it after
the step in progress (``KeyboardInterrupt``) and the model stays usable.
"""

import os
from typing import Any, Iterator, Literal, Optional, Sequence, Union, overload

import numpy as np
import numpy.typing as npt
import pyarrow as pa

__version__: str

_Path = Union[str, "os.PathLike[str]"]
_TableName = Literal["steps", "candidates", "prompts"]

class Error(Exception):
    """Base of every error logitprobe raises (besides TypeError for an argument of the
    wrong type, and KeyboardInterrupt for Ctrl-C)."""

class UsageError(Error, ValueError):
    """A bad setting or input: what the command line refuses with exit code 2. The message
    is its one line, naming the keyword argument to change."""

class ModelNotFoundError(Error, FileNotFoundError):
    """A model path that does not exist (or a catalogue model not fetched yet)."""

class EngineError(Error, RuntimeError):
    """The engine failed on something that is not a bad setting."""

class Model:
    """A model loaded by llama.cpp (a GGUF file) or ONNX Runtime (an ONNX export), held by
    an engine thread of its own until it is closed or dropped.

    ``model`` is what the command line's ``--model`` takes: a GGUF file, an ONNX folder (or
    a file in it), a Hugging Face repo id or a catalogue alias (``~`` is expanded).
    ``backend`` is ``"llama"``, ``"onnx"`` or ``"test"``; None picks it from the path. The
    other keywords are ``trace``'s engine flags. A context manager: ``with`` closes it.
    """

    def __init__(
        self,
        model: _Path,
        *,
        backend: Optional[Literal["llama", "onnx", "test"]] = None,
        model_file: Optional[str] = None,
        threads: Optional[int] = None,
        threads_batch: Optional[int] = None,
        ctx_size: Optional[int] = None,
        batch_size: Optional[int] = None,
        n_gpu_layers: int = 0,
        flash_attn: Optional[Literal["on", "off", "auto"]] = None,
        cache_type_k: Optional[str] = None,
        cache_type_v: Optional[str] = None,
        device: Optional[Literal["cpu", "cuda", "auto"]] = None,
        ort_lib: Optional[_Path] = None,
        verbose: bool = False,
    ) -> None: ...
    @property
    def info(self) -> dict[str, Any]:
        """What the engine says about the model: name, engine and version, device, vocabulary
        sizes, context, BOS/EOS and end-of-generation ids, and the engine's details."""
    @property
    def backend(self) -> Literal["llama", "onnx", "test"]:
        """The engine."""
    @property
    def path(self) -> str:
        """The file or folder the engine opened."""
    def tokenize(self, text: str, *, add_bos: Optional[bool] = None, special: bool = False) -> list[int]:
        """Token ids of ``text``: BOS in front by the model's own rule unless ``add_bos``
        says, special-token text as its id only with ``special``."""
    def detokenize(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """The text of token ids (bytes that are not UTF-8 replaced)."""
    def trace(
        self,
        prompts: Union[str, Sequence[str]],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.8,
        top_k: int = 0,
        top_p: float = 0.95,
        min_p: float = 0.0,
        repeat_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        seed: Optional[int] = None,
        ignore_eos: bool = False,
        stop: Union[str, Sequence[str], None] = None,
        use_chat_template: bool = False,
        chat_template: Optional[str] = None,
        system_prompt: Optional[str] = None,
        parse_special: bool = True,
        min_k: int = 8,
        max_k: int = 64,
        mass_threshold: float = 0.95,
        parallel: Optional[int] = None,
    ) -> "Run":
        """Generates from each prompt and traces every step, as ``logitprobe trace`` does
        with the same settings: the same seed gives the same tokens and values. The keywords
        are ``trace``'s flags with its defaults (``seed=None``: a fresh one, in ``Run.seed``);
        ``chat_template`` is a name (chatml, gemma, llama3, phi3) or Jinja source and implies
        ``use_chat_template``; ``parallel``: sequences decoded together (default: the
        prompts, at most 8)."""
    def stream(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.8,
        top_k: int = 0,
        top_p: float = 0.95,
        min_p: float = 0.0,
        repeat_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        seed: Optional[int] = None,
        ignore_eos: bool = False,
        stop: Union[str, Sequence[str], None] = None,
        use_chat_template: bool = False,
        chat_template: Optional[str] = None,
        system_prompt: Optional[str] = None,
        parse_special: bool = True,
        min_k: int = 8,
        max_k: int = 64,
        mass_threshold: float = 0.95,
    ) -> "Stream":
        """Generates from one prompt and yields each step as it is produced (a dict shaped
        as a step of the trace file); the keywords are ``trace``'s."""
    @overload
    def score(self, texts: Union[str, Sequence[int]]) -> npt.NDArray[np.float64]: ...
    @overload
    def score(self, texts: Sequence[Union[str, Sequence[int]]]) -> list[npt.NDArray[np.float64]]: ...
    def score(self, texts: Any) -> Any:
        """Teacher-forced log-probabilities of each token after the first (temperature 1):
        the numbers ``compare`` gives side A and ``trace`` gives a token. A text is tokenized
        as ``compare`` tokenizes a corpus (entry ``i`` is token ``i + 1`` of
        ``tokenize(text)``); a list of ints is scored as those token ids. One input gives one
        array, a list of them a list of arrays."""
    def close(self) -> None:
        """Frees the model once the calls queued are done."""
    def __enter__(self) -> "Model": ...
    def __exit__(self, *args: object) -> bool: ...

class Run:
    """The result of ``Model.trace``."""

    @property
    def steps(self) -> pa.Table:
        """One row per prompt and step: ``prompt_index``, ``step``, ``token_id``, ``token``,
        then for ``raw_`` and ``processed_``: ``entropy``, ``k_used``, ``top_mass_used``,
        ``selected_prob``, ``selected_logprob``, ``selected_rank``."""
    @property
    def candidates(self) -> pa.Table:
        """One row per prompt, step, distribution (``raw``, ``processed``) and kept
        candidate: ``prompt_index``, ``step``, ``distribution``, ``rank``, ``token_id``,
        ``token``, ``prob``, ``logprob``."""
    @property
    def prompts(self) -> pa.Table:
        """One row per prompt: ``prompt_index``, ``prompt``, ``system_prompt``,
        ``prompt_tokens``, ``generated_tokens``, ``stop_reason``, ``generated_text``,
        ``mean_entropy_raw``, ``mean_entropy_processed``, ``lowest_raw_selected_prob``,
        ``lowest_raw_selected_step``."""
    @property
    def texts(self) -> list[str]:
        """Each prompt's generated text (up to a stop string, special tokens skipped)."""
    @property
    def token_ids(self) -> list[list[int]]:
        """Each prompt's generated token ids."""
    @property
    def stop_reasons(self) -> list[str]:
        """Why each prompt stopped: ``end_of_generation``, ``max_new_tokens``,
        ``stop_string``, ``context_full`` ..."""
    @property
    def seed(self) -> int:
        """The seed the run sampled with."""
    @property
    def parallel(self) -> int:
        """Sequences decoded together."""
    @property
    def timings(self) -> dict[str, Any]:
        """Where the time went, as run.json's ``timings``."""
    def traces(self) -> list[dict[str, Any]]:
        """Each prompt's ``adaptive_token_trace.json``, as the command line writes it."""
    def to_pandas(self, table: _TableName = "steps") -> Any:
        """A table as a pandas DataFrame (needs pandas)."""
    def to_polars(self, table: _TableName = "steps") -> Any:
        """A table as a polars DataFrame (needs polars)."""
    def __len__(self) -> int: ...

class Stream(Iterator[dict[str, Any]]):
    """The steps of ``Model.stream`` as they are produced. Dropping it, ``close()`` or
    Ctrl-C stops the generation after the step in progress."""

    def __iter__(self) -> "Stream": ...
    def __next__(self) -> dict[str, Any]: ...
    @property
    def text(self) -> Optional[str]:
        """The generated text, once the stream is exhausted."""
    @property
    def stop_reason(self) -> Optional[str]:
        """Why the generation stopped, once the stream is exhausted."""
    @property
    def token_ids(self) -> Optional[list[int]]:
        """The generated token ids, once the stream is exhausted."""
    def close(self) -> None:
        """Stops the generation after the step in progress."""

class Comparison:
    """What ``compare`` found; ``str()`` gives the command line's tables."""

    @property
    def positions(self) -> pa.Table:
        """One row per scored position and B, ``compare.csv``'s columns."""
    @property
    def summary(self) -> pa.Table:
        """One row per B: PPL, KLD, Δp and same-top statistics (nested fields joined with
        ``_``: ``kld_mean``, ``kld_p99`` ...)."""
    @property
    def summaries(self) -> list[dict[str, Any]]:
        """Per B, its summary as ``compare.json`` holds it."""
    def to_dict(self) -> dict[str, Any]:
        """The whole report, as ``compare.json`` holds it."""
    def save(self, out: _Path) -> None:
        """Writes ``compare.json``, ``compare.csv``, the plots and ``report.html``."""

def compare(
    a: _Path,
    b: Union[_Path, Sequence[_Path]],
    *,
    text: str,
    ctx_size: int = 512,
    score_all: bool = False,
    chunks: Optional[int] = None,
    threads: Optional[int] = None,
    threads_batch: Optional[int] = None,
    batch_size: Optional[int] = None,
    n_gpu_layers: int = 0,
    flash_attn: Optional[Literal["on", "off", "auto"]] = None,
    cache_type_k: Optional[str] = None,
    cache_type_v: Optional[str] = None,
    device: Optional[Literal["cpu", "cuda", "auto"]] = None,
    ort_lib: Optional[_Path] = None,
    min_k: int = 8,
    max_k: int = 64,
    mass_threshold: float = 0.95,
    verbose: bool = False,
) -> Comparison:
    """Scores ``text`` with model A and each model B, teacher-forced, and compares their
    distributions position by position: ``logitprobe compare --text-file``'s statistics.
    ``a`` and each ``b`` are a model path or ``"BACKEND:MODEL"``; the text is cut into
    ``ctx_size``-token chunks, the second half of each scored (``score_all``: every
    position), at most ``chunks`` of them."""
