"""Children that a test interrupts with SIGINT (what Ctrl-C delivers) must not inherit an ignored SIGINT: a shell
without job control starts background commands (e.g. a CI script run with `&`) with SIGINT ignored, children inherit
that, and Python then never turns SIGINT into KeyboardInterrupt.  ``Popen(..., preexec_fn=default_sigint)``."""

import signal


def default_sigint() -> None:
    """In the child, before exec: SIGINT back to its default, as in a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
