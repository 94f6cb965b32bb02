"""Phase 4 against sglang-jax's own loader: start ONE Engine with load_format="auto", then map the same
checkpoint with the tool and compare every placed array with the loader's Param (bytes, shape, dtype,
sharding). Prints one JSON line. Usage: python tests/mapping_probe.py --model-id DIR --device cpu --tp-size N"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import run_param_swap as rps  # noqa: E402


def main() -> None:
    args = rps.parse_args(sys.argv[1:])
    device = rps.configure_platform(args)
    info = rps.read_checkpoint_info(os.path.abspath(args.model_id))
    engine, model_runner = rps.start_engine(rps.engine_kwargs(args, info.path, device, "auto"))
    try:
        params = rps.engine_params(model_runner)
        flat = rps.flatten(rps.read_mllm_tree(args, info)[0])
        plan = rps.plan_swap(flat, params, info.num_kv_heads)
        result = {"num_params": len(params), "num_planned": len(plan), "mismatched": [], "sharding_differs": [],
                  "replicas": {}}
        for item in plan:
            ours = rps.place(item, flat[item.source], info.num_kv_heads)
            theirs = params[item.target].get_value()
            if ours.sharding != theirs.sharding or ours.dtype != theirs.dtype:
                result["sharding_differs"].append(item.target)
            a, b = np.asarray(ours), np.asarray(theirs)
            if a.shape != b.shape or a.view(np.uint16).tobytes() != b.view(np.uint16).tobytes():
                result["mismatched"].append(item.target)
            if item.op == "kv_heads":
                result["replicas"][item.target] = item.replicas
    finally:
        engine.shutdown()
    print(json.dumps(result), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
