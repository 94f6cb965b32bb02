"""--rl-steps: the colocated RL cycle. Each step: release the engine's memory, the trainer's donating AdamW step
on the same devices, resume with the new params, roll out. Three checks: the released engine holds nothing
(rl_released), nothing recompiles after the first resume (rl_no_recompile), the engine computes with each
step's params (rl_weights_follow_trainer)."""

import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from typing import Any

from param_swap import checkpoint, checks, generation, memory, oracles, placement, trees
from param_swap.checkpoint import CheckpointInfo
from param_swap.flags import RunConfig
from param_swap.generation import Answer
from param_swap.hosts import HOSTS
from param_swap.phases import PhaseLog
from param_swap.swapper import ParamSwapper

RELEASED_LIMIT = 0.02  # what a released engine may still hold, over one set of its params: the meter's noise
POINTS = ("rolled_out", "released", "trained", "resumed")  # where each step samples the memory


class Trainer:
    """The trainer's side of the cycle: its params (the flat MLLM-JAX tree on the devices), AdamW's state, and
    one jitted update that donates both (their buffers are reused). The gradient is synthetic, a fixed function
    of the weights and the step: the tool has no model forward of its own."""

    def __init__(self, params: Mapping[str, Any], learning_rate: float):
        import jax
        import optax

        self.params = dict(params)
        self.optimizer = optax.adamw(learning_rate)
        mesh = next(iter(self.params.values())).sharding.mesh
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        # the moments are zeros like each param (its sharding); the step count goes on the params' devices too
        self.opt_state = jax.tree.map(lambda a: a if a.ndim else jax.device_put(a, replicated),
                                      self.optimizer.init(self.params))
        shardings = jax.tree.map(lambda a: a.sharding, (self.params, self.opt_state))
        self.update = jax.jit(self.step_fn, donate_argnums=(0, 1), out_shardings=shardings)

    def step_fn(self, params, opt_state, step):
        import jax
        import jax.numpy as jnp
        import optax

        grads = jax.tree.map(lambda p: jnp.sin(p.astype(jnp.float32) * 1000.0 + step).astype(p.dtype), params)
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def step(self, k: int) -> float:
        """One donating update; returns its seconds (until the new params are ready)."""
        import jax

        t = time.perf_counter()
        self.params, self.opt_state = self.update(self.params, self.opt_state, k)
        jax.block_until_ready((self.params, self.opt_state))
        return time.perf_counter() - t

    def optimizer_arrays(self) -> list:
        import jax

        return [a for a in jax.tree.leaves(self.opt_state) if trees.on_devices(a)]

    def held(self) -> dict:
        """Every device array the trainer holds (params and optimizer state), flat: counted apart from the
        engine's."""
        return {**self.params, **{f"optimizer.{i}": a for i, a in enumerate(self.optimizer_arrays())}}


def every_host(value: int) -> int:
    """This host's figure summed over every host (a step every rank takes)."""
    return sum(HOSTS.agree("rl_sum", value))


def sample() -> dict:
    """The memory at one point of a step (every host's devices)."""
    return memory.phase_memory()["jax_device_memory_summary"]


def changed(before: Answer, after: Answer) -> bool:
    """The answer moved with the weights: other tokens, or other logprobs for the same tokens."""
    if before.output_logprobs is None or after.output_logprobs is None:
        return before.output_ids != after.output_ids
    return (before.output_ids, before.output_logprobs) != (after.output_ids, after.output_logprobs)


def run_step(phases: PhaseLog, cfg: RunConfig, swapper: ParamSwapper, trainer: Trainer, info: CheckpointInfo,
             k: int, previous: Answer, folder: str | None, param_bytes: int) -> tuple[dict, Answer]:
    """One step of the cycle; returns its rl_step fields and the rollout's answer."""
    at = {"rolled_out": sample()}
    released = swapper.release(trainer_held=trainer.held())
    at["released"] = memory.phase_memory(released["memory"])["jax_device_memory_summary"]  # every host's
    trainer_bytes = every_host(sum(memory.buffer_bytes(trainer.params.values()).values()))  # unique, as the meter
    optimizer_bytes = every_host(sum(memory.buffer_bytes(trainer.optimizer_arrays()).values()))
    released_engine = released["bytes_in_use_sum"] - released["trainer_bytes_sum"]  # both: every host's
    train_s = trainer.step(k)
    at["trained"] = sample()
    if folder:  # the checkpoint the weights oracle loads (and --rl-save keeps): this step's params
        checkpoint.write_checkpoint(trainer.params, info.path, folder)
    compiles = placement.count_compiles(all_threads=True)
    resumed = swapper.resume(trainer.params, mode=cfg.swap_mode, alias=cfg.alias, rollback=cfg.rollback,
                             trainer_held=trainer.held())
    at["resumed"] = sample()
    t = time.perf_counter()
    answer = generation.generate_greedy(swapper.engine, cfg.prompt, cfg.max_new_tokens, logprobs=True)
    rollout_s = time.perf_counter() - t
    resume_compiles = placement.count_compiles(all_threads=True) - compiles
    phases.answers.append((f"rl_step {k}", answer))
    verified = oracles.verify_weights(phases, swapper.state, folder, swap=f"rl step {k}") \
        if cfg.verify_weights else None
    swap = resumed["swap"]
    fields = {"step": k, "rollout_s": round(rollout_s, 4), "release_s": released["release_s"],
              "train_s": round(train_s, 4), "resume_s": resumed["resume_s"], "kv_rebuild_s": resumed["kv_rebuild_s"],
              "swap_s": swap["swap_s"], "released_engine_bytes_sum": released_engine,
              "released_limit_bytes": int(RELEASED_LIMIT * param_bytes),
              "engine_held_arrays": released["engine_held_arrays"],
              "engine_held_trainer_buffers": released["engine_held_trainer_buffers"],
              "trainer_bytes_sum": trainer_bytes, "optimizer_bytes_sum": optimizer_bytes,
              "kv_bytes_sum": resumed["kv_bytes_sum"], "kv_bytes_freed": released["kv_bytes_freed"],
              "weights_bytes_deleted": released["weights_bytes_deleted"],
              "weights_bytes_let_go": released["weights_bytes_let_go"], "resume_compiles": resume_compiles,
              "aliased_bytes_sum": swap["aliased_bytes_sum"], "copied_bytes_sum": swap["copied_bytes_sum"],
              "weights_verified": verified, "answer_changed": changed(previous, answer),
              "memory_at": {p: at[p] for p in POINTS}, "output_ids": answer.output_ids, "text": answer.text}
    return fields, answer


def run_rl_steps(phases: PhaseLog, cfg: RunConfig, swapper: ParamSwapper, info: CheckpointInfo,
                 tree: Mapping[str, Any], previous: Answer) -> None:
    """--rl-steps N: N steps from the trainer's tree (the one swapped in first), one rl_step line each, then the
    three checks. With --verify-weights each step's params are written as a checkpoint (a temporary folder;
    --rl-save DIR keeps the last) for sglang-jax's own loader to compare with the engine, bit for bit."""
    param_bytes = every_host(sum(memory.device_bytes(p.get_value()) for p in swapper.state.params.values()))
    trainer = Trainer(trees.as_flat(tree), cfg.rl_learning_rate)
    if cfg.rounds % 2:  # the engine ends the rounds on B: the baseline is the trainer's params
        swapper.swap(trainer.params, cfg.swap_mode, cfg.alias, cfg.rollback)
    if cfg.rounds % 2 or previous.output_logprobs is None:  # the baseline, with logprobs
        previous = generation.generate_greedy(swapper.engine, cfg.prompt, cfg.max_new_tokens, logprobs=True)
    steps = []
    work = tempfile.mkdtemp(prefix="param_swap_rl_")
    try:
        for k in range(1, cfg.rl_steps + 1):
            phases.begin(f"rl_step {k}")
            folder = os.path.join(work, f"step_{k}") if (cfg.verify_weights or cfg.rl_save) else None
            fields, previous = run_step(phases, cfg, swapper, trainer, info, k, previous, folder, param_bytes)
            steps.append(fields)
            phases.phase("rl_step", **fields)
            if folder and k > 1:
                shutil.rmtree(os.path.join(work, f"step_{k - 1}"), ignore_errors=True)
        if cfg.rl_save and steps:
            shutil.copytree(os.path.join(work, f"step_{cfg.rl_steps}"), cfg.rl_save, dirs_exist_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    check_steps(phases, steps)
    checks.check_generate(phases)


def check_steps(phases: PhaseLog, steps: list[dict]) -> None:
    """rl_released, rl_no_recompile, rl_weights_follow_trainer over every step."""
    held = [s["step"] for s in steps if s["released_engine_bytes_sum"] > s["released_limit_bytes"]
            or s["engine_held_arrays"] or s["engine_held_trainer_buffers"]]
    phases.check("rl_released", bool(steps) and not held, failed_steps=held,
                 released_engine_bytes_sum=[s["released_engine_bytes_sum"] for s in steps],
                 limit_bytes=steps[0]["released_limit_bytes"] if steps else None,
                 engine_held_arrays=[s["engine_held_arrays"] for s in steps],
                 engine_held_trainer_buffers=[s["engine_held_trainer_buffers"] for s in steps])
    recompiled = [s["step"] for s in steps[1:] if s["resume_compiles"]]
    if len(steps) > 1:  # the first resume compiles the KV allocator: only the steps after it can show a recompile
        phases.check("rl_no_recompile", not recompiled, failed_steps=recompiled,
                     resume_compiles=[s["resume_compiles"] for s in steps])
    stale = [s["step"] for s in steps if not s["answer_changed"] or s["weights_verified"] is False]
    phases.check("rl_weights_follow_trainer", bool(steps) and not stale, failed_steps=stale,
                 answer_changed=[s["answer_changed"] for s in steps],
                 weights_verified=[s["weights_verified"] for s in steps])
