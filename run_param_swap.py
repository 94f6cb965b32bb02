#!/usr/bin/env python3
"""Hot-swap an RL trainer's Qwen2/Qwen3/Llama/Qwen3-MoE weights into a running sglang-jax Engine, in place, and
prove that the engine then computes with exactly those weights.

The script a user runs (`python run_param_swap.py --help`, the console script `run-param-swap`, the one file
`dist/run_param_swap.pyz`) and the module an RL loop imports (`import run_param_swap as rps`: docs/api.md).
Behind it, the package param_swap/, one concern per module, in the order a run's data flows through them
(docs/architecture.md).
"""

import os
import sys

import param_swap  # imports nothing heavy: the stop signals are blocked before numpy starts a thread

CONSOLE_SCRIPT = "run-param-swap"  # pyproject.toml's [project.scripts]: imports this module, then calls cli()
if __name__ == "__main__" or os.path.basename(sys.argv[0]) == CONSOLE_SCRIPT:
    param_swap.block_stop_signals()  # for the Stopper; not when imported as the API

from param_swap.checkpoint import load_mllm_params  # noqa: E402
from param_swap.demo import write_demo_checkpoint  # noqa: E402
from param_swap.errors import (  # noqa: E402
    EXIT_BAD_INPUT,
    EXIT_CHECK_FAILED,
    EXIT_ENGINE,
    EXIT_OK,
    ExitCode,
    ToolError,
)
from param_swap.families import FAMILIES, SUPPORTED_ARCHITECTURES  # noqa: E402
from param_swap.generation import Answer  # noqa: E402
from param_swap.hosts import HOSTS  # noqa: E402
from param_swap.runner import cli, main  # noqa: E402
from param_swap.sglang_adapter import SUPPORTED_STACKS, probe_sglang, start_engine  # noqa: E402
from param_swap.swapper import DEFAULT_BUCKET_MB, ParamSwapper  # noqa: E402

__all__ = [
    "ParamSwapper", "start_engine", "load_mllm_params", "HOSTS", "ToolError", "Answer",  # the API (docs/api.md)
    "ExitCode", "EXIT_OK", "EXIT_CHECK_FAILED", "EXIT_BAD_INPUT", "EXIT_ENGINE", "DEFAULT_BUCKET_MB",
    "probe_sglang", "SUPPORTED_STACKS", "FAMILIES", "SUPPORTED_ARCHITECTURES", "write_demo_checkpoint",
    "main", "cli", "CONSOLE_SCRIPT",
]

if __name__ == "__main__":
    cli()
