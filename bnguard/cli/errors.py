"""What the command line's exit codes mean, and the error that names bad input."""

DONE, FAILED, BAD_INPUT, NOT_WRITTEN_WORSE, NOT_WRITTEN_UNLIKE = 0, 1, 2, 3, 4


class InputError(Exception):
    """Input the command cannot use (a missing file, a checkpoint that does not fit the model, data the model
    refuses): exit code 2, with a message that names the problem and the fix."""
