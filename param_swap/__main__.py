"""`python -m param_swap` and the one file dist/run_param_swap.pyz (make pyz): the command line."""

import param_swap

param_swap.block_stop_signals()  # before numpy or anything else starts a thread: the Stopper's sigwait

from param_swap.runner import cli  # noqa: E402

cli()
