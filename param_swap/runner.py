"""The run: run() is the table of contents, each step a function that prints its phase line; main() and cli()
(python run_param_swap.py, run-param-swap, python dist/run_param_swap.pyz)."""

import functools
import gc
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping
from typing import Any

from param_swap import (
    checkpoint,
    checks,
    demo,
    flags,
    memory,
    oracles,
    placement,
    report,
    rl_cycle,
    rounds,
    serve_load,
    trees,
    validation,
)
from param_swap import sglang_adapter as adapter
from param_swap.checkpoint import CheckpointInfo
from param_swap.errors import ExitCode, ToolError, log
from param_swap.flags import RunConfig, TrainerSharding, WeightsSource
from param_swap.generation import Answer
from param_swap.hosts import HOSTS
from param_swap.phases import PhaseLog, finish
from param_swap.planning import SwapItem
from param_swap.serve_load import ServeLoad
from param_swap.stopper import Stopper
from param_swap.swapper import ParamSwapper


def configure_platform(cfg: RunConfig) -> str:
    """Pick the platform and, for cpu, ask XLA for --tp-size virtual devices. Must run before JAX starts."""
    env_platform = os.environ.get("JAX_PLATFORMS", "")
    if cfg.device and env_platform and env_platform != cfg.device:
        raise ToolError("arguments", f"--device {cfg.device} conflicts with JAX_PLATFORMS={env_platform}",
                        "unset JAX_PLATFORMS or make it equal to --device (sglang-jax asserts they match)")
    device = cfg.device or env_platform or ""
    if cfg.device == "cpu" and cfg.tp_size > 0:
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
        count = cfg.tp_size // cfg.nnodes  # this host's share of the mesh
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    if device:
        os.environ["JAX_PLATFORMS"] = device
    return device


def skip_torch_unless_needed(cfg: RunConfig) -> None:
    """USE_TORCH=0 (unless the caller set it) when neither --verify-logits nor --weights-source torch needs
    torch: transformers would import it and slow sglang-jax's import (docs/benchmarks.md). Before transformers."""
    if not (cfg.verify_logits or cfg.weights_source == WeightsSource.TORCH):
        os.environ.setdefault("USE_TORCH", "0")


def start_jax(phases: PhaseLog, cfg: RunConfig) -> tuple[str, int]:
    """jax_ready: JAX's devices (several hosts: the coordination service first). Returns the platform and the
    tensor-parallel size (--tp-size 0: every device)."""
    phases.begin("jax_ready")
    import jax

    HOSTS.start(cfg.nnodes, cfg.node_rank, cfg.dist_init_addr, cfg.watchdog_timeout,  # before JAX's backend
                cfg.device or os.environ.get("JAX_PLATFORMS", ""), cfg.host_lost_after)
    device = cfg.device or os.environ.get("JAX_PLATFORMS") or jax.default_backend()
    devices = jax.devices()
    tp = cfg.tp_size or len(devices)
    if tp != len(devices):
        raise ToolError("arguments", f"--tp-size {tp} != {len(devices)} devices",
                        "pass the --tp-size of jax.device_count(), or 0 (on CPU, --device cpu makes --tp-size "
                        "virtual devices)")
    phases.phase("jax_ready", jax_version=jax.__version__, backend=jax.default_backend(), device=device,
                 device_count=len(devices), devices=[str(d) for d in devices], tp_size=tp, dp_size=1,
                 nnodes=HOSTS.nnodes, local_devices=[str(d) for d in jax.local_devices()])
    return device, tp


def validate_checkpoints(cfg: RunConfig, model_id: str, device: str, tp: int) -> CheckpointInfo:
    """The checkpoint (and --model-id-b) validated against the mesh and the flags, before any engine starts."""
    info = checkpoint.read_checkpoint_info(checkpoint.resolve_checkpoint(model_id, cfg.download_dir))
    checkpoint.validate_checkpoint(info)
    validation.validate_parallelism(info, tp)
    validation.validate_cpu_devices(cfg, info, device, tp)
    if cfg.rounds and cfg.model_id_b:
        info_b = checkpoint.read_checkpoint_info(checkpoint.resolve_checkpoint(cfg.model_id_b, cfg.download_dir))
        checkpoint.validate_checkpoint(info_b)
        if checkpoint.expected_tensors(info_b) != checkpoint.expected_tensors(info):
            raise ToolError("checkpoint", f"--model-id-b {cfg.model_id_b} has other sizes than --model-id "
                            "(the engine's model)", "B must be the same architecture and sizes as A")
    return info


def engine_kwargs(cfg: RunConfig, model_path: str, device: str, load_format: str) -> dict:
    """sglang-jax ServerArgs for this run (shared with the tests' reference engine)."""
    return dict(
        model_path=model_path, load_format=load_format, enable_single_process=True, device=device,
        tp_size=cfg.tp_size, dtype=cfg.dtype, download_dir=cfg.download_dir,
        mem_fraction_static=cfg.mem_fraction_static, max_prefill_tokens=cfg.max_prefill_tokens,
        max_total_tokens=cfg.max_total_tokens, max_running_requests=cfg.max_running_requests,
        disable_precompile=not cfg.precompile, watchdog_timeout=cfg.watchdog_timeout,
        random_seed=cfg.random_seed, moe_backend=cfg.moe_backend, log_level="warning",
        **({"nnodes": cfg.nnodes, "node_rank": cfg.node_rank, "dist_init_addr": cfg.dist_init_addr}
           if cfg.nnodes > 1 else {}),
    )


def start_dummy_engine(phases: PhaseLog, cfg: RunConfig, info: CheckpointInfo, device: str,
                       stack: dict) -> tuple[Any, ParamSwapper]:
    """engine_ready_dummy: the Engine with load_format="dummy", and the ParamSwapper on it (the Stopper's too)."""
    phases.begin("engine_ready_dummy")
    t = time.perf_counter()
    engine, model_runner = adapter.start_engine(engine_kwargs(cfg, info.path, device, "dummy"))
    swapper = ParamSwapper(engine, info.num_kv_heads, cfg.bucket_mb, cfg.transpose, cfg.allow_nonfinite)
    if phases.stopper is not None:
        phases.stopper.swapper = swapper
    params = swapper.state.params
    phases.phase("engine_ready_dummy", seconds=round(time.perf_counter() - t, 3), model_path=info.path,
                 load_format="dummy", num_leaves=len(adapter.leaves_of(model_runner)), num_params=len(params),
                 param_bytes_sum=memory.param_bytes_sum(swapper.state.arrays()),
                 sglang_jax_version=stack["sglang-jax"], flax_version=stack["flax"], stack=stack["stack"])
    return engine, swapper


def generate_answer(phases: PhaseLog, cfg: RunConfig, engine, load: ServeLoad | None = None,
                    phase: str = "generate_result", logprobs: bool = False) -> Answer:
    """generate_before_swap (the dummy engine's answer) and generate_result (the swapped engine's)."""
    phases.begin(phase)
    t = time.perf_counter()
    out = serve_load.checked_answer(engine, cfg, load, logprobs)
    phases.phase(phase, seconds=round(time.perf_counter() - t, 3), prompt=cfg.prompt, **out.phase_fields())
    phases.answers.append((phase, out))
    return out


def read_host_tree(phases: PhaseLog, cfg: RunConfig, info: CheckpointInfo) -> dict:
    """mllm_params_cpu_ready: the checkpoint as the MLLM-JAX tree on the host (read-only numpy leaves)."""
    phases.begin("mllm_params_cpu_ready")
    t = time.perf_counter()
    tree, read_s = checkpoint.read_mllm_tree(info, cfg.weights_source, cfg.mllm_param_dtype)
    flat = trees.flatten(tree)
    seconds = time.perf_counter() - t
    phases.phase("mllm_params_cpu_ready", weights_source=cfg.weights_source, dtype=cfg.mllm_param_dtype,
                 num_tensors=len(flat), host_bytes=sum(a.nbytes for a in flat.values()), read_s=round(read_s, 4),
                 convert_s=round(seconds - read_s, 4), seconds=round(seconds, 4), sample_keys=sorted(flat)[:3])
    return tree


def trainer_sharding(item: SwapItem, shape: tuple, how: TrainerSharding):
    """Where --weights-source trainer puts a source tensor. fsdp: first axis split over all devices where it
    divides, else replicated; replicated; engine: exactly the target's sharding where the shapes match (the
    source_sharding otherwise: a KV projection before its heads are repeated, an lm_head kernel)."""
    import jax

    if how == TrainerSharding.ENGINE:
        return placement.source_sharding(item, shape)
    devices = item.sharding.mesh.devices.reshape(-1)
    mesh = jax.sharding.Mesh(devices, ("fsdp",))
    split = how == TrainerSharding.FSDP and len(shape) > 0 and shape[0] % len(devices) == 0
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp" if split else None))


def put_trainer_tree(phases: PhaseLog, cfg: RunConfig, swapper: ParamSwapper, tree: Mapping[str, Any]) -> dict:
    """mllm_params_device_ready (--weights-source trainer): the host tree on the devices as a trainer holds it
    (--trainer-sharding; engine: also in the engine's dtype), so that the swap runs device to device."""
    phases.begin("mllm_params_device_ready")
    t = time.perf_counter()
    flat = trees.flatten(tree)
    on_device, aliasable = {}, 0
    for item in swapper.plan(flat):
        src = flat[item.source]
        dtype = item.dtype if cfg.trainer_sharding == TrainerSharding.ENGINE else src.dtype
        arr = placement.put(src.astype(dtype, copy=False), trainer_sharding(item, src.shape, cfg.trainer_sharding))
        on_device[item.source] = arr.block_until_ready()
        aliasable += item.nbytes_sum if placement.can_alias(item, arr) else 0
    split = memory.memory_split(swapper.state.arrays(), list(on_device.values()), swapper.guard.serving_bytes)
    phases.phase("mllm_params_device_ready", trainer_sharding=cfg.trainer_sharding,
                 dtypes=sorted({str(a.dtype) for a in on_device.values()}), num_tensors=len(on_device),
                 trainer_bytes_sum=split.trainer_bytes_sum, aliasable_bytes_sum=aliasable,
                 seconds=round(time.perf_counter() - t, 4))
    return trees.nest(on_device)


def plan_first_swap(phases: PhaseLog, cfg: RunConfig, swapper: ParamSwapper, tree: Mapping[str, Any]) -> list:
    """sglang_param_dict_ready: the whole plan validated against the engine before anything touches it
    (placement happens in the swap, in both modes: streaming a bucket at a time, bulk all of them first)."""
    phases.begin("sglang_param_dict_ready")
    t = time.perf_counter()
    plan = swapper.plan(tree)
    phases.phase("sglang_param_dict_ready", swap_mode=cfg.swap_mode, num_arrays=len(plan),
                 bucket_mb=None if cfg.swap_mode == "bulk" else cfg.bucket_mb, transpose=swapper.transpose,
                 param_bytes_sum=sum(i.nbytes_sum for i in plan), seconds=round(time.perf_counter() - t, 4))
    return plan


def swap_first(phases: PhaseLog, cfg: RunConfig, swapper: ParamSwapper, load: ServeLoad | None,
               tree: Mapping[str, Any], plan) -> dict:
    """weights_swapped_from_mllm: the first swap (A). Returns {nnx path: the engine's new array}."""
    phases.begin("weights_swapped_from_mllm")
    result = serve_load.swap_in(cfg, swapper, load, tree, plan, cfg.alias, "first swap", "A")
    report_ = result.report.as_json()
    phases.check("leaves_unchanged", report_["leaves_unchanged"], **result.leaves)
    phases.phase("weights_swapped_from_mllm", **report_)
    return result.arrays


def run(phases: PhaseLog, cfg: RunConfig, model_id: str) -> None:
    """The phases in the order they run (docs/phases.md): the table of contents."""
    device, tp_size = start_jax(phases, cfg)
    phases.begin("checkpoint")  # validation: config, tensors, parallelism, token budget
    info = validate_checkpoints(cfg, model_id, device, tp_size)
    prompt = validation.chat_prompt(info.path, cfg.prompt) if cfg.chat else cfg.prompt
    cfg = cfg.resolved(model_id=info.path, tp_size=tp_size, prompt=prompt)
    validation.validate_token_budget(cfg, info)
    stack = adapter.probe_sglang((info.architecture, cfg.moe_backend))  # what the swap uses of sglang-jax (exit 2)
    gc.freeze()  # sglang-jax's imported objects never become garbage: freezing them keeps each phase's gc short
    HOSTS.agree("checkpoint")  # several hosts: every one has validated its copy before any engine starts
    engine, swapper = start_dummy_engine(phases, cfg, info, device, stack)
    state, load = swapper.state, None
    try:
        before = generate_answer(phases, cfg, engine, phase="generate_before_swap")
        tree = read_host_tree(phases, cfg, info)
        trainer = None  # --weights-source trainer: the tree on the devices, held (as a trainer would) to the end
        try:
            if cfg.weights_source == WeightsSource.TRAINER:
                tree = trainer = put_trainer_tree(phases, cfg, swapper, tree)
            plan = plan_first_swap(phases, cfg, swapper, tree)
            if cfg.serve_load:
                load = ServeLoad(engine, swapper, cfg)
                load.start(phases)
            param_dict = swap_first(phases, cfg, swapper, load, tree, plan)
        except ToolError as e:
            if load is not None:
                load.after_failure(phases, e)
            checks.check_restored(e, engine, cfg, before)
            raise
        if cfg.verify_param_sharing:
            checks.check_param_sharing(phases, state, param_dict)
        if cfg.verify_weights:
            oracles.hold_for_collectives(load)
            oracles.verify_weights(phases, state, info.path)
        if load is not None:
            load.hold()  # the memory phases below are sampled with no forward in flight
        if cfg.keep_param_dict:
            split = memory.memory_split(state.arrays(), trees.trainer_arrays(trainer), swapper.guard.serving_bytes)
            phases.phase("before_generate_param_dict_kept", num_arrays=len(param_dict),
                         **split.as_json("bytes_in_use_sum_after_swap"))
        else:
            del param_dict
            phases.phase("after_cleanup")
        out = generate_answer(phases, cfg, engine, load, logprobs=cfg.verify_logits)
        checks.check_generate(phases)
        checks.check_swap_effective(phases, before, out)
        if cfg.verify_logits and HOSTS.rank == 0:  # a host forward: on rank 0 only
            oracles.verify_logits(phases, cfg, info.path, out)
        if cfg.keep_param_dict:
            del param_dict
            phases.phase("after_drop_param_dict")
        checks.check_single_copy(phases, cfg.single_copy_tolerance,
                                 ["weights_swapped_from_mllm", "before_generate_param_dict_kept"])
        flat_b = plan_b = None
        if cfg.rounds:
            flat_b, plan_b = rounds.swap_rounds(phases, cfg, swapper, load, info, trees.as_flat(tree), plan, out)
        if load is not None:
            rounds.serve_results(phases, cfg, load, trees.as_flat(tree), plan, flat_b, plan_b)
        if cfg.rl_steps:
            rl_cycle.run_rl_steps(phases, cfg, swapper, info, tree, phases.answers[-1][1])
    finally:
        engine.shutdown()


def json_only_stdout() -> None:
    """stdout carries the phase JSON only: what libraries print on file descriptor 1 (gloo's connection lines
    on CPU hosts) goes to stderr."""
    sys.stdout.flush()
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(fd, "w", buffering=1)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = flags.run_config(flags.parse_args(argv))
    except ToolError as e:  # a command line that does not parse: its error line and summary like any bad input
        try:
            phases = PhaseLog(flags.json_out_of(argv))
        except OSError:
            phases = PhaseLog(None)
        return finish(phases, None, e)
    if cfg.nnodes > 1:
        json_only_stdout()
    try:
        phases = PhaseLog(cfg.json_out)
    except OSError as e:
        return finish(PhaseLog(None), cfg, ToolError("arguments", f"cannot open --json-out {cfg.json_out}: "
                                                     f"{e.strerror}", "the folder must exist and be writable"))
    phases.stopper = Stopper(phases, cfg)
    phases.stopper.install()
    HOSTS.on_failure = phases.stopper.stop  # another rank failed (or is lost) while this one was busy elsewhere
    HOSTS.doing = lambda: phases.doing  # the phase each heartbeat names
    demo_tmp = None
    try:
        validation.validate_args(cfg)
        configure_platform(cfg)
        skip_torch_unless_needed(cfg)
        if cfg.wandb:
            phases.sinks.append(report.WandbSink(cfg))
        model_id = cfg.model_id
        if cfg.demo:
            folder = cfg.demo_dir or (demo_tmp := tempfile.mkdtemp(prefix="param_swap_demo_"))
            if demo_tmp:
                phases.stopper.cleanup.append(functools.partial(shutil.rmtree, demo_tmp, ignore_errors=True))
            model_id = demo.write_demo_checkpoint(folder, arch=cfg.arch)
            log(f"demo checkpoint in {folder}")
        run(phases, cfg, model_id)
        return finish(phases, cfg)
    except Exception as e:  # noqa: BLE001 - every failure ends in one error line, the summary, an exit code
        if not isinstance(e, ToolError) or (e.__cause__ is not None and e.exit_code != ExitCode.BAD_INPUT):
            traceback.print_exc()  # bad input: its error line says it all; a failure: where it came from
        if not isinstance(e, ToolError):
            last = phases.records[-1]["phase"] if phases.records else "start"
            e = ToolError(f"after_{last}", f"{type(e).__name__}: {e}", "see the traceback on stderr", ExitCode.ENGINE)
        return finish(phases, cfg, HOSTS.explain(e, None, phases.doing))
    finally:
        if demo_tmp:
            shutil.rmtree(demo_tmp, ignore_errors=True)


def cli(argv: list[str] | None = None) -> None:
    """`python run_param_swap.py`, the console script `run-param-swap` and the .pyz: main(), then exit at once."""
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    HOSTS.shutdown()
    os._exit(code)  # sglang-jax's threads can hang or abort interpreter teardown; everything is written
