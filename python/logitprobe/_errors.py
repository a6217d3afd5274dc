"""The exceptions logitprobe raises; each message is the command line's one line."""


class Error(Exception):
    """Base of every error logitprobe raises (besides TypeError for an argument of the wrong
    type, and KeyboardInterrupt for Ctrl-C)."""


class UsageError(Error, ValueError):
    """A bad setting or input: what the command line refuses with exit code 2. The message
    says what to change, naming the keyword argument."""


class ModelNotFoundError(Error, FileNotFoundError):
    """A model path that does not exist (or a catalogue model not fetched yet)."""


class EngineError(Error, RuntimeError):
    """The engine failed on something that is not a bad setting."""
