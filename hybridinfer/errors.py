class HybridInferError(Exception):
    """A problem with the user's input: the CLI prints its message on one line and exits non-zero."""


EXIT_INTERRUPTED = 130  # exit status after Ctrl-C, as shells report SIGINT
