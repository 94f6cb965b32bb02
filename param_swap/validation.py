"""Validate before you mutate: the flags, the checkpoint against the mesh, the prompt against the token budget,
all before JAX or the engine start (each problem is exit 2, naming it)."""

import os
import re

from param_swap import checkpoint, serve_load
from param_swap.checkpoint import CheckpointInfo
from param_swap.errors import ToolError
from param_swap.flags import RunConfig, WeightsSource
from param_swap.hosts import HEARTBEAT_S


def validate_args(cfg: RunConfig) -> None:
    """Usage errors, found before JAX or the engine start."""
    problems = []
    if not cfg.prompt:
        problems.append(("--prompt is empty", "give a non-empty prompt: the check compares generated tokens"))
    if cfg.max_new_tokens < 1:
        problems.append((f"--max-new-tokens {cfg.max_new_tokens} < 1", "generate at least one token"))
    if cfg.tp_size < 0:
        problems.append((f"--tp-size {cfg.tp_size} < 0", "0 means all devices"))
    if cfg.rounds < 0:
        problems.append((f"--rounds {cfg.rounds} < 0", "0 turns rounds off"))
    if cfg.arch != "qwen2" and not cfg.demo:
        problems.append((f"--arch {cfg.arch} without --demo", "--arch picks the family of the demo checkpoint; "
                         "a real checkpoint's config.json names its own"))
    if cfg.rl_steps < 0:
        problems.append((f"--rl-steps {cfg.rl_steps} < 0", "0 turns the RL cycle off"))
    if cfg.rl_steps and cfg.serve_load:
        problems.append(("--rl-steps with --serve-load", "release() needs an idle engine (no request in flight): run "
                         "the RL cycle and the serving load separately"))
    if cfg.rl_steps and cfg.weights_source != WeightsSource.TRAINER:
        problems.append((f"--rl-steps with --weights-source {cfg.weights_source}", "the cycle's trainer holds its "
                         "params on the devices: --weights-source trainer (--demo implies it)"))
    if cfg.rl_save and not cfg.rl_steps:
        problems.append(("--rl-save without --rl-steps", "give --rl-steps N"))
    if not cfg.rl_learning_rate > 0:
        problems.append((f"--rl-learning-rate {cfg.rl_learning_rate} <= 0", "a positive learning rate, e.g. 0.01"))
    if cfg.serve_load < 0:
        problems.append((f"--serve-load {cfg.serve_load} < 0", "0 turns the load off"))
    if not cfg.serve_seconds > 0:
        problems.append((f"--serve-seconds {cfg.serve_seconds} <= 0", "seconds per requests/s window, e.g. 10"))
    if cfg.weights_source != WeightsSource.TRAINER and (cfg.alias or cfg.trainer_sharding):
        problems.append(("--alias and --trainer-sharding need --weights-source trainer",
                         "a host tree is always copied to the devices"))
    if cfg.max_running_requests < 1:
        problems.append((f"--max-running-requests {cfg.max_running_requests} < 1",
                         "sglang-jax needs at least one running request"))
    if not 0 < cfg.mem_fraction_static <= 1:
        problems.append((f"--mem-fraction-static {cfg.mem_fraction_static} is not in (0, 1]",
                         "the fraction of device memory for weights and KV cache, e.g. 0.8"))
    for flag in ("max_prefill_tokens", "max_total_tokens"):
        if getattr(cfg, flag) < 1:
            problems.append((f"--{flag.replace('_', '-')} {getattr(cfg, flag)} < 1", "a token budget must be positive"))
    if cfg.watchdog_timeout <= 0:
        problems.append((f"--watchdog-timeout {cfg.watchdog_timeout} <= 0", "seconds, e.g. 1800"))
    if not cfg.host_lost_after > 2 * HEARTBEAT_S:
        problems.append((f"--host-lost-after {cfg.host_lost_after} <= {2 * HEARTBEAT_S}",
                         f"seconds, more than a few heartbeats (every {HEARTBEAT_S} s), e.g. 15"))
    if not cfg.bucket_mb >= 0:
        problems.append((f"--bucket-mb {cfg.bucket_mb} < 0", "0 places one tensor at a time"))
    if cfg.nnodes < 1 or not 0 <= cfg.node_rank < cfg.nnodes:
        problems.append((f"--nnodes {cfg.nnodes} --node-rank {cfg.node_rank}", "ranks are 0 .. nnodes-1"))
    elif cfg.nnodes > 1:
        if not re.fullmatch(r"[^\s:]+:\d+", cfg.dist_init_addr or ""):
            problems.append((f"--nnodes {cfg.nnodes} needs --dist-init-addr HOST:PORT (got {cfg.dist_init_addr})",
                             "rank 0's address, the same on every host, e.g. the first worker's IP and a free port"))
        if cfg.tp_size % cfg.nnodes:
            problems.append((f"--tp-size {cfg.tp_size} is not a multiple of --nnodes {cfg.nnodes}",
                             "give --tp-size: every host holds tp/nnodes devices of the mesh"))
        unsupported = [f for f, on in (("--demo", cfg.demo),
                                       ("--weights-source torch", cfg.weights_source == WeightsSource.TORCH)) if on]
        if unsupported:
            problems.append((f"{', '.join(unsupported)} with --nnodes > 1 is not supported",
                             "multi-host runs swap safetensors read on every host (or that tree on the devices: "
                             "--weights-source trainer)"))
    if cfg.single_copy_tolerance < 1.0:
        problems.append((f"--single-copy-tolerance {cfg.single_copy_tolerance} < 1", "e.g. 1.02 allows 2%"))
    if cfg.verify_logits:
        import importlib.util

        missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
        if missing:
            problems.append((f"--verify-logits needs {' and '.join(missing)}, which is not installed",
                             "pip install torch==2.9.1 transformers (the reference forward runs on the host CPU; "
                             "any torch build works)"))
    if problems:
        raise ToolError("arguments", "; ".join(p for p, _ in problems), "; ".join(h for _, h in problems))


def chat_prompt(path: str, prompt: str) -> str:
    """--chat: the prompt as one user message in the tokenizer's chat template, ready for the assistant."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.chat_template:
        raise ToolError("arguments", f"--chat: the tokenizer in {path} has no chat template",
                        "drop --chat (base checkpoints) or use an instruct checkpoint")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def validate_token_budget(cfg, info: CheckpointInfo) -> None:
    """sglang-jax refuses a request whose prompt and new tokens do not fit its token budget or the model's
    context; count the prompt with the checkpoint's tokenizer and say so before anything starts."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(info.path)
        prompt_tokens = len(tokenizer(cfg.prompt)["input_ids"])
    except Exception as e:  # noqa: BLE001 - a checkpoint without a usable tokenizer cannot be served either
        raise ToolError("checkpoint", f"cannot load the tokenizer of {info.path}: {type(e).__name__}: {e}",
                        "the engine needs the checkpoint's tokenizer files") from e
    if cfg.serve_load:
        prompts = serve_load.load_prompts(tokenizer, cfg.prompt)
        if not prompts:
            raise ToolError("arguments", "--serve-load: every load prompt starts with the same token as --prompt",
                            "start --prompt with another word")
        longest = max(len(tokenizer(p)["input_ids"]) for p in prompts) + 2 * cfg.max_new_tokens
        if longest >= min(cfg.max_total_tokens, info.context_len):
            raise ToolError("arguments", f"--serve-load: its longest request ({longest} tokens: a load prompt + 2 x "
                            f"--max-new-tokens) does not fit --max-total-tokens {cfg.max_total_tokens} or the "
                            f"model's context of {info.context_len}", "lower --max-new-tokens")
    total = prompt_tokens + cfg.max_new_tokens
    problems = [(f"--max-total-tokens {cfg.max_total_tokens}", "raise --max-total-tokens")
                for _ in [0] if total >= cfg.max_total_tokens]
    problems += [(f"the model's context of {info.context_len} tokens (max_position_embeddings)",
                  "shorten the prompt or --max-new-tokens") for _ in [0] if total >= info.context_len]
    if problems:
        raise ToolError("arguments", f"the prompt ({prompt_tokens} tokens) + --max-new-tokens {cfg.max_new_tokens} "
                        f"= {total} tokens do not fit " + " nor ".join(p for p, _ in problems),
                        "; ".join(h for _, h in problems))


def validate_parallelism(info: CheckpointInfo, tp: int) -> None:
    if info.num_heads % tp:
        raise ToolError("arguments", f"--tp-size {tp} does not divide the {info.num_heads} attention heads",
                        f"choose a tp size that divides {info.num_heads}")
    if tp > info.num_kv_heads and tp % info.num_kv_heads:
        raise ToolError("arguments", f"--tp-size {tp} is not a multiple of the {info.num_kv_heads} KV heads",
                        "sglang-jax replicates KV heads only by a whole factor")


def validate_cpu_devices(cfg, info: CheckpointInfo, device: str, tp: int) -> None:
    """Refuse (exit 2) a float32 engine on more CPU virtual devices than this process has cores: XLA's CPU
    all-reduce deadlocks there and aborts the process with no JSON line (docs/phases.md, "Exit codes")."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local = tp // cfg.nnodes  # this host's devices
    if device == "cpu" and local > cores and checkpoint.engine_dtype(cfg.dtype, info) == "float32":
        raise ToolError("arguments", f"a float32 engine on {local} CPU devices with {cores} core(s): XLA's CPU "
                        "all-reduce deadlocks there and aborts the process after 40 s",
                        f"use --dtype bfloat16, or --tp-size {cores} or less on this machine (docs/phases.md, "
                        "exit codes)", devices=local, cores=cores)
