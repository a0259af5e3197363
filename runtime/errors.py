"""Errors that users see: one line naming the problem and the fix, with a documented exit code."""

# Exit codes shared by every lmforge command line (documented in the README).
EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_BAD_INPUT = 2
EXIT_ACCURACY = 3
EXIT_BACKEND_UNAVAILABLE = 4


class LmforgeError(Exception):
    """A failure the user can act on; `str()` is the one-line message, `exit_code` what the CLI returns."""

    # Not the user's mistake unless a subclass says so: a failing TensorRT or CUDA call is exit 1, not 2.
    exit_code = EXIT_UNEXPECTED

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class BadInputError(LmforgeError):
    exit_code = EXIT_BAD_INPUT


class ArtifactError(BadInputError):
    """A missing, incomplete or tampered artifact."""


class AccuracyError(LmforgeError):
    exit_code = EXIT_ACCURACY
