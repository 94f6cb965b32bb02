"""release() and resume() refusing bad input, in one process (tests/test_rl_cycle.py). Usage: python
tests/rl_api_probe.py CKPT OTHER_CKPT (OTHER: another layout, e.g. untied). Prints one JSON line."""

import asyncio
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import param_swap  # noqa: E402

param_swap.block_stop_signals()

import jax  # noqa: E402
import numpy as np  # noqa: E402

import run_param_swap as rps  # noqa: E402
from param_swap import flags, generation, runner  # noqa: E402

PROMPT, NEW = "The quick brown fox", 8


def refusal(call) -> dict:
    try:
        call()
    except rps.ToolError as e:
        return {"stage": e.stage, "exit_code": e.exit_code, **{k: v for k, v in e.details.items()
                                                                if isinstance(v, (int, bool, str))}}
    raise AssertionError("not refused")


def main() -> None:
    folder, other = sys.argv[1], sys.argv[2]
    args = flags.parse_args(["--model-id", folder, "--device", "cpu", "--tp-size", "4"])
    engine, _ = rps.start_engine(runner.engine_kwargs(args, folder, "cpu", "dummy"))
    swapper = rps.ParamSwapper(engine, bucket_mb=1)
    params = swapper.to_engine_layout(rps.load_mllm_params(folder))
    swapper.swap(params, alias=True)
    before = swapper.generate(PROMPT, NEW).output_ids
    refused, out = {}, {}

    async def release_while_serving():
        guard, start = swapper.guard, swapper.guard.forwards
        request = asyncio.ensure_future(engine.async_generate(prompt=PROMPT, sampling_params=generation.greedy(40)))
        while guard.forwards < start + 2:
            await asyncio.sleep(0.01)
        try:
            await swapper.release_async()
            raise AssertionError("not refused")
        except rps.ToolError as e:
            refused["in_flight"] = {"stage": e.stage, "requests_in_flight": e.details.get("requests_in_flight")}
        answer = await request
        return answer["meta_info"]["completion_tokens"] == 40

    out["in_flight_request_finished"] = swapper.run_on_loop(release_while_serving())
    out["answers_before_equal"] = swapper.generate(PROMPT, NEW).output_ids == before
    swapper.release(trainer_held=params)
    refused["generate_while_released"] = refusal(lambda: swapper.generate(PROMPT, NEW))
    refused["swap_while_released"] = refusal(lambda: swapper.swap(params))
    refused["release_twice"] = refusal(swapper.release)
    refused["resume_without_tree"] = refusal(swapper.resume)
    refused["resume_other_layout"] = refusal(lambda: swapper.resume(rps.load_mllm_params(other)))
    out["still_released_after_refusals"] = refusal(lambda: swapper.generate(PROMPT, NEW))["stage"]
    diverged = dict(params)
    key = "model.layers_1.mlp.up_proj.kernel"  # not in the first 1 MB bucket: a real restore
    bad = np.array(params[key])  # a host copy, one NaN, back into the same sharding
    bad[0, 0] = np.nan
    diverged[key] = jax.device_put(bad, params[key].sharding)
    refused["resume_nan"] = refusal(lambda: swapper.resume(diverged, alias=True))
    out["still_released_after_nan"] = refusal(lambda: swapper.generate(PROMPT, NEW))["stage"]
    out["params_abstract_after_nan"] = not swapper.state.arrays() and all(
        not hasattr(leaf, "is_deleted") for leaf in swapper.state.leaves())
    swapper.resume(params, alias=True, trainer_held=params)
    out["resumed_answer_equal"] = swapper.generate(PROMPT, NEW).output_ids == before
    out["kv_only"] = swapper.release(weights=False)
    out["kv_only"] = {k: v for k, v in out["kv_only"].items() if k != "memory"}
    swapper.resume()
    out["kv_only_answer_equal"] = swapper.generate(PROMPT, NEW).output_ids == before
    print(json.dumps({"refused": refused, **out}), flush=True)
    jax.effects_barrier()
    engine.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
