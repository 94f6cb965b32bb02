"""The modules behind run_param_swap.py, one concern each, in the order a run's data flows through them
(docs/architecture.md). Importing the package imports nothing else: the entry blocks the stop signals first."""

import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)


def block_stop_signals() -> None:
    """Block SIGINT, SIGTERM and SIGQUIT in this thread and in every thread started after it, for the Stopper's
    sigwait: call it before numpy (OpenBLAS) or anything else starts a thread. Not when imported as the API."""
    signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))
