"""Greedy output_ids from an Engine that loads a checkpoint with sglang-jax's OWN loader (load_format="auto").

The differential baseline: the swapped engine must produce exactly these tokens. Run in its own process:
  python tests/reference_generate.py --model-id DIR --device cpu --tp-size 4 --prompt P --max-new-tokens N
Prints one JSON line: {"output_ids": [...], "text": ...}.
"""

import json
import os
import sys

os.environ.setdefault("USE_TORCH", "0")  # transformers without torch: nothing here needs it (6 s less)
import run_param_swap as rps  # noqa: E402
from param_swap import flags, generation, runner  # noqa: E402


def main() -> None:
    args = flags.parse_args(sys.argv[1:])
    device = runner.configure_platform(args)
    import jax

    args.tp_size = args.tp_size or jax.device_count() // args.dp_size
    engine, _ = rps.start_engine(runner.engine_kwargs(args, os.path.abspath(args.model_id), device, "auto"))
    try:
        out = generation.generate_greedy(engine, args.prompt, args.max_new_tokens)
    finally:
        engine.shutdown()
    print(json.dumps({"output_ids": out["output_ids"], "text": out["text"]}), flush=True)
    os._exit(0)  # sglang-jax threads can abort interpreter teardown; the answer is already out


if __name__ == "__main__":
    main()
