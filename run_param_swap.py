#!/usr/bin/env python3
"""Hot-swap an RL trainer's Qwen2/Qwen3/Llama/Qwen3-MoE weights into a running sglang-jax Engine, in place.

Reads a Hugging Face Qwen2/Qwen2.5, Qwen3, Llama or Qwen3-MoE checkpoint, converts it on the host to the
MLLM-JAX flax params tree, places every tensor as a sharded jax.Array in the
engine's own dtype and sharding, swaps the engine's nnx Params in place and
rebinds `model_runner.model_state_leaves`, then generates. Prints one JSON line
per phase on stdout (logs go to stderr) with device memory summed over devices,
so you can see that the engine holds ONE set of params, even while the caller
keeps its dict of the very same arrays.

Two independent oracles judge the swap in the same run: --verify-weights compares every engine Param bit
for bit with what sglang-jax's own loader makes of the checkpoint (tensor by tensor, no second set), and
--verify-logits compares the engine's logprobs with transformers' float32 forward on the host. Generation
is greedy with ignore_eos; the ids are the scheduler's own record of each request.

Phases, in the order they run ([] only with their flag):
  jax_ready -> engine_ready_dummy -> generate_before_swap -> mllm_params_cpu_ready
  -> sglang_param_dict_ready -> [serve_load_started] -> weights_swapped_from_mllm -> [param_sharing_check]
  -> [weights_verified] -> before_generate_param_dict_kept | after_cleanup -> generate_result
  -> [logits_verified] -> [after_drop_param_dict] -> [swap_round (-> weights_verified) ...]
  -> [serve_reference -> serve_load] -> summary   (docs/phases.md)

Every swap pauses generation (retract), swaps, flushes the radix cache (a refused flush is an error) and
continues; --serve-load N keeps N requests in flight across the swaps and checks that none is lost, that no
forward step ran on a mix of weights, and that no stale cache survives.

Exit codes: 0 every check passed; 1 a verification check failed; 2 bad input or
usage (found before the engine is touched); 3 the engine failed (start,
generate, swap or crash); 130 / 143 stopped by SIGINT / SIGTERM (still with
its error line and summary; a swap in progress completes first). With several
hosts (--nnodes), every rank exits with the same code.

  python run_param_swap.py --demo                        # tiny random Qwen2, 4 virtual CPU devices
  python run_param_swap.py --demo --arch qwen3_moe       # ... of another family: qwen3, llama, qwen3_moe
  python run_param_swap.py --model-id Qwen/Qwen2.5-3B-Instruct --tp-size 4 --chat \\
      --keep-param-dict --verify-param-sharing --verify-weights --verify-logits | tee swap.log   # TPU VM
  python run_param_swap.py --model-id DIR --tp-size 8 --nnodes 2 --node-rank R --dist-init-addr IP:PORT \\
      --verify-weights > swap.log        # on every host of a pod slice (rank R), rank 0's IP: docs/tpu.md
  run-param-swap --demo                                  # the same, installed (pip install ".[cpu]"): README

As a module (import run_param_swap): ParamSwapper, the API an RL loop uses (docs/api.md). The file reads in
run order: the model families (one row each), the command line, the meter and the phase log, several hosts,
JAX, the checkpoint, the sglang-jax adapter, the engine's state, generation, the host tree, the plan and
placement, the swap (pause, rollback, host agreement, report), ParamSwapper, the load, the phases, the checks
and oracles, rounds, the demo checkpoint, reports, the verdict, the Stopper, and run() (the table of contents).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import gc
import hashlib
import json
import logging
import math
import os
import re
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import weakref
from collections.abc import Mapping
from typing import Any

CONSOLE_SCRIPT = "run-param-swap"  # pyproject.toml's [project.scripts]: imports this module, then calls cli()
if __name__ == "__main__" or os.path.basename(sys.argv[0]) == CONSOLE_SCRIPT:
    # before numpy (OpenBLAS) or anything else starts a thread: see Stopper. Not when imported as the API.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGQUIT})

import numpy as np  # noqa: E402

DEFAULT_MODEL_ID = "Qwen/Qwen2.5-3B-Instruct"

@dataclasses.dataclass(frozen=True)
class Family:
    """A model family the tool swaps, one row each (as llama.cpp's converter registers one class per
    architecture): everything that differs between families. What every family's checkpoint shares (the
    tensors a config implies: CHECKPOINT_TENSORS; their MLLM-JAX names: HF_TO_MLLM; their sglang-jax paths:
    MLLM_TO_SGLANG) is switched on by the row's flags; the targets' shapes, dtypes and shardings come from
    the engine's own Params. Adding a family: one row here (docs/phases.md, "Adding a model family")."""
    architecture: str  # config.json architectures[0]
    arch: str  # --demo --arch
    model_type: str
    biases: str  # "qkv": q/k/v biases always (Qwen2); "attention_bias": q/k/v/o biases when config says so
    qk_norm: bool  # per-head RMSNorm of q and k (Qwen3)
    moe: bool = False  # sparse MLP layers: a router and stacked experts (all but config's mlp_only_layers)
    # (MLLM regex, sglang-jax template, op) rows of this family only, tried before MLLM_TO_SGLANG; and per MoE
    # backend of the engine (its --moe-backend)
    sglang_rows: list = dataclasses.field(default_factory=list)
    moe_backend_rows: dict[str, list] = dataclasses.field(default_factory=dict)
    # what of sglang-jax this family needs beyond SGLANG_NEEDS, per MoE backend (the adapter's probe checks it):
    # (module, attribute, need, why) rows as SGLANG_NEEDS's
    needs: dict[str, list] = dataclasses.field(default_factory=dict)
    # its --demo checkpoint's config.json beyond the shared keys (write_demo_checkpoint): config -> extra keys
    demo_config: Any = None


FAMILIES = {f.architecture: f for f in [
    Family("Qwen2ForCausalLM", "qwen2", "qwen2", "qkv", qk_norm=False),
    Family("Qwen3ForCausalLM", "qwen3", "qwen3", "attention_bias", qk_norm=True),
    Family("LlamaForCausalLM", "llama", "llama", "attention_bias", qk_norm=False, demo_config=lambda c: {
        "rope_theta": 500000.0, "mlp_bias": False, "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024}}),
    Family("Qwen3MoeForCausalLM", "qwen3_moe", "qwen3_moe", "attention_bias", qk_norm=True, moe=True,
           sglang_rows=[  # sglang-jax calls Qwen3-MoE's o_proj c_proj
               (r"model\.layers_(\d+)\.self_attn\.o_proj\.(kernel|bias)", "model.layers.{0}.self_attn.c_proj.{1}",
                "copy")],
           moe_backend_rows={
               "epmoe": [  # stacked experts [E, in, out], sharded (expert, ., tensor)
                   (r"model\.layers_(\d+)\.mlp\.experts\.gate_proj\.kernel", "model.layers.{0}.mlp.wi_0", "copy"),
                   (r"model\.layers_(\d+)\.mlp\.experts\.up_proj\.kernel", "model.layers.{0}.mlp.wi_1", "copy"),
                   (r"model\.layers_(\d+)\.mlp\.experts\.down_proj\.kernel", "model.layers.{0}.mlp.wo", "copy")],
               "fused": [  # the same stacks under other names, experts split over every device
                   (r"model\.layers_(\d+)\.mlp\.experts\.gate_proj\.kernel", "model.layers.{0}.mlp.w1", "copy"),
                   (r"model\.layers_(\d+)\.mlp\.experts\.up_proj\.kernel", "model.layers.{0}.mlp.w3", "copy"),
                   (r"model\.layers_(\d+)\.mlp\.experts\.down_proj\.kernel", "model.layers.{0}.mlp.w2", "copy")]},
           # "lacks:" the code must not hold this text. bd09a87's dummy initialiser builds the experts' mesh only
           # when ep_size > 1 and puts the expert axis on the main mesh otherwise: a Qwen3-MoE engine with
           # load_format "dummy" (epmoe, ep_size 1) cannot start there ("Resource axis: expert ... is not
           # found"); 0.0.3rc99 fixed it
           needs={"epmoe": [("sgl_jax.srt.utils.weight_utils", "WeightLoader._load_dummy_weights",
                             "lacks:if ep_size > 1:", "a Qwen3-MoE engine with dummy weights cannot start; fixed "
                             "in 0.0.3rc99")]},
           # 4 experts, 2 per token; layer 0 dense (mlp_only_layers), the others sparse
           demo_config=lambda c: {"num_experts": 4, "num_experts_per_tok": 2,
                                  "moe_intermediate_size": c["intermediate_size"] // 2, "mlp_only_layers": [0],
                                  "decoder_sparse_step": 1, "norm_topk_prob": True}),
]}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)
EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_ENGINE = 0, 1, 2, 3
HOST_DTYPES = ("bfloat16", "float16", "float32")
DEFAULT_BUCKET_MB = 256.0  # --bucket-mb: docs/benchmarks.md ("Buckets")
HEARTBEAT_S = 0.5  # --nnodes: how often every rank says it is alive, and looks at the others' (Hosts.watch)
DEFAULT_HOST_LOST_S = 15.0  # --host-lost-after: a rank silent this long is gone (JAX's own heartbeat: 100 s)
TRANSPOSE_ON = {"cpu": "host", "gpu": "device", "tpu": "device"}  # --transpose auto, per platform
# Platforms whose collectives are XLA:CPU's in-process ones (docs/benchmarks.md "Device to device"): they run a
# 16-bit float reshard in float32 (a convert on each side), so a device source is resharded as its bits
# (uint16: 5x faster); and two collective programs in flight can deadlock in their rendezvous (the process
# aborts after 40 s), so each resharding step is waited on before the next is dispatched
IN_PROCESS_COLLECTIVES = {"cpu"}
TRAINER_SHARDINGS = ("fsdp", "replicated", "engine")  # --weights-source trainer: how the trainer holds the tree

# Per engine dtype: (largest |engine logprob - reference logprob| of a generated token, largest margin by
# which a generated token may trail the reference's argmax). Set from measured distributions: docs/phases.md.
LOGITS_TOLERANCE = {"float32": (0.1, 0.1), "bfloat16": (1.0, 1.0)}

def log(msg: str) -> None:
    print(f"[run_param_swap] {msg}", file=sys.stderr, flush=True)


class ToolError(Exception):
    """A failure we can explain: one JSON error line, then the summary, then `exit_code`."""

    def __init__(self, stage: str, error: str, hint: str = "", exit_code: int = EXIT_BAD_INPUT, **details):
        super().__init__(error)
        self.stage, self.error, self.hint, self.exit_code, self.details = stage, error, hint, exit_code, details

    def record(self) -> dict:
        return {"phase": "error", "stage": self.stage, "error": self.error, "hint": self.hint,
                "exit_code": self.exit_code, **self.details}


def on_devices(x) -> bool:
    """A trainer-resident source: a jax.Array (numpy arrays and torch tensors are host sources)."""
    return hasattr(x, "sharding") and hasattr(x, "is_deleted")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model-id", default=DEFAULT_MODEL_ID, help="HF hub id or local folder (default: %(default)s)")
    p.add_argument("--prompt", default="Explain what a parameter hot-swap is in one sentence.")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", choices=["tpu", "gpu", "cpu"], default=None,
                   help="JAX platform (default: $JAX_PLATFORMS, else JAX's default backend). With cpu the "
                        "tool creates --tp-size virtual CPU devices itself.")
    p.add_argument("--tp-size", type=int, default=0, help="tensor parallel size; 0 = all devices")
    p.add_argument("--dp-size", type=int, default=1,
                   help="data parallel size; only 1 (sglang-jax's single-process engine, which the swap needs)")
    p.add_argument("--weights-source", choices=["safetensors", "torch", "trainer"], default="safetensors",
                   help="safetensors: read the shards lazily with numpy (no torch); torch: "
                        "transformers.AutoModelForCausalLM(...).state_dict(); trainer: read the safetensors, put "
                        "the tree on the devices as a trainer holds it (--trainer-sharding), then swap device to "
                        "device (no host round trip)")
    p.add_argument("--trainer-sharding", choices=TRAINER_SHARDINGS, default=None,
                   help="--weights-source trainer: fsdp (default; first axis split over all devices where it "
                        "divides, else replicated, in --mllm-param-dtype), replicated, or engine (each target's "
                        "shape, dtype and sharding where the layouts match)")
    p.add_argument("--alias", action="store_true",
                   help="--weights-source trainer: where a trainer array already is the target (shape, dtype, "
                        "sharding), the engine's Param becomes that very array: no copy. A trainer that donates "
                        "it to its next step deletes the engine's weight (caught before generation, exit 3)")
    p.add_argument("--mllm-param-dtype", choices=sorted(HOST_DTYPES), default="bfloat16",
                   help="dtype of the MLLM flax tree on the host (the trainer's); cast to the engine's dtype "
                        "on the host when placing")
    p.add_argument("--swap-mode", choices=["streaming", "bulk"], default="streaming",
                   help="streaming: place a bucket of tensors (--bucket-mb), assign them, free the arrays they "
                        "replace, go on (peak = one set + one bucket or the largest tensor); bulk: build every "
                        "array, then assign all (the reference algorithm, peak = two sets)")
    p.add_argument("--bucket-mb", type=float, default=None,
                   help="streaming: device MB (summed over devices) placed before they are assigned; 0 = one "
                        f"tensor at a time (default: {DEFAULT_BUCKET_MB:g}, chosen in docs/benchmarks.md; --demo: 1, "
                        "so that its 11 MB of params span several buckets)")
    p.add_argument("--transpose", choices=["auto", "host", "device"], default="auto",
                   help="where kernels stored [out, in] become [in, out]: host (the strided view handed to "
                        "jax.device_put), device (placed as stored, one jitted transpose on the devices); auto: "
                        + ", ".join(f"{k} {v}" for k, v in TRANSPOSE_ON.items()) + " (docs/benchmarks.md)")
    p.add_argument("--no-rollback", dest="rollback", action="store_false", default=None,
                   help="no rollback: a failure mid-swap then shuts the engine down (exit 3) instead of "
                        "restoring the previous weights. Default: rollback whenever it is free (the previous "
                        "weights came from a read-only host tree or from the dummy initialiser: placed again on "
                        "failure), else a host copy of each replaced array for host sources and none for "
                        "--weights-source trainer (a copy would go device->host)")
    p.add_argument("--rollback", dest="rollback", action="store_true",
                   help="rollback also where it costs a host copy of each replaced array (--weights-source trainer)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="swap in weights that hold NaN or infinite values. Default: refused (exit 2, the tensors "
                        "named, the engine on its previous weights): each bucket is counted on the devices as "
                        "placed, before it is assigned (the tree itself first where the swap has no rollback)")
    p.add_argument("--keep-param-dict", action="store_true",
                   help="keep the {nnx path: jax.Array} dict alive through generation (it shares the engine's arrays)")
    p.add_argument("--verify-param-sharing", action="store_true",
                   help="check that EVERY engine Param and model_state_leaves entry is the dict's very array "
                        "(object identity and device buffers)")
    p.add_argument("--verify-weights", action="store_true",
                   help="check weights_equal_loader: after the swap, compare EVERY engine Param (bits, shape, dtype, "
                        "sharding) with what sglang-jax's own loader makes of the checkpoint, tensor by tensor, in "
                        "this process")
    p.add_argument("--verify-logits", action="store_true",
                   help="check logits_match_reference: the engine's logprob of each generated token against "
                        "transformers' float32 forward of the checkpoint on the host (needs torch)")
    p.add_argument("--logprob-tolerance", type=float, default=None,
                   help="--verify-logits: largest |engine - reference| logprob per token (default by engine dtype: "
                        + ", ".join(f"{k} {v[0]:g}" for k, v in LOGITS_TOLERANCE.items()) + ")")
    p.add_argument("--argmax-margin", type=float, default=None,
                   help="--verify-logits: largest gap between the reference's top logprob and the generated token's "
                        "(default by engine dtype: " + ", ".join(f"{k} {v[1]:g}" for k, v in LOGITS_TOLERANCE.items()) + ")")
    p.add_argument("--chat", action="store_true",
                   help="wrap --prompt as a user message with the tokenizer's chat template (instruct checkpoints)")
    p.add_argument("--rounds", type=int, default=0,
                   help="after the first swap, swap N more times alternating B (a deterministic perturbation, or "
                        "--model-id-b) and A, checking outputs repeat and memory does not grow")
    p.add_argument("--model-id-b", default=None, help="second checkpoint for --rounds (default: perturbed A)")
    p.add_argument("--serve-load", type=int, default=0, metavar="N",
                   help="keep N greedy requests in flight (clients sending one after another, prompts and lengths "
                        "varied, some spanning a swap) across the first swap and every --rounds swap, and check "
                        "serve_no_lost_requests, serve_no_mixed_forward and serve_fresh_after_swap; reports how "
                        "long each swap stops serving and requests/s with and without swaps")
    p.add_argument("--serve-seconds", type=float, default=10.0,
                   help="--serve-load: length of each requests/s window, without and with swaps (default: %(default)s)")
    p.add_argument("--single-copy-tolerance", type=float, default=1.02,
                   help="bytes_in_use_sum after the swap may be at most engine_ready_dummy x this (default: %(default)s)")
    p.add_argument("--download-dir", default=None, help="HF cache folder for hub downloads")
    p.add_argument("--json-out", default=None, help="also write the JSON lines to this file")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="bar chart of bytes_in_use_sum per phase, with the one-set-of-params level marked")
    p.add_argument("--wandb", action="store_true",
                   help="log each phase's memory and timings to Weights & Biases (process 0 only; a W&B "
                        "failure is a warning, never a failed run)")
    p.add_argument("--wandb-project", default="param-swap")
    p.add_argument("--demo", action="store_true",
                   help="build a tiny random-weight checkpoint (--arch) and run the whole verification with "
                        "--keep-param-dict --verify-param-sharing --verify-weights --verify-logits: on 4 virtual CPU "
                        "devices, or with --device gpu|tpu on all of that platform's devices")
    p.add_argument("--demo-dir", default=None, help="where --demo writes its checkpoint (kept); default: a temp folder")
    p.add_argument("--arch", choices=[f.arch for f in FAMILIES.values()], default="qwen2",
                   help="--demo: the model family of the tiny checkpoint (default: %(default)s)")
    eng = p.add_argument_group("engine arguments (defaults: the reference TPU run's)")
    eng.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32", "auto"],
                     help="engine dtype (default: %(default)s)")
    eng.add_argument("--mem-fraction-static", type=float, default=0.8)
    eng.add_argument("--max-prefill-tokens", type=int, default=1024)
    eng.add_argument("--max-total-tokens", type=int, default=4096)
    eng.add_argument("--max-running-requests", type=int, default=16)
    eng.add_argument("--precompile", action="store_true", help="let the engine precompile (the reference run disabled it)")
    eng.add_argument("--watchdog-timeout", type=float, default=1800.0,
                     help="seconds sglang-jax's watchdog waits on a forward before killing the run (slow CPU "
                          "compiles need more than its 300 s default)")
    eng.add_argument("--random-seed", type=int, default=0)
    eng.add_argument("--nnodes", type=int, default=1,
                     help="hosts of a multi-host slice (a TPU pod: one process per host). Run the same command on "
                          "every host with its --node-rank; rank 0 prints the phase JSON, every rank exits with the "
                          "same code (docs/tpu.md). With --device cpu each process makes tp/nnodes virtual devices")
    eng.add_argument("--node-rank", type=int, default=0, help="this host's rank, 0 .. nnodes-1")
    eng.add_argument("--host-lost-after", type=float, default=DEFAULT_HOST_LOST_S, metavar="S",
                     help=f"--nnodes > 1: a rank whose heartbeat (every {HEARTBEAT_S:g} s) stops for S seconds is "
                          "lost: every other rank ends with an error line naming it and its phase (exit 3) instead "
                          "of JAX's own fatal abort after 100 s (default: %(default)s)")
    eng.add_argument("--dist-init-addr", default=None, metavar="HOST:PORT",
                     help="--nnodes > 1: rank 0's address for JAX's coordination service (sglang-jax also uses "
                          "PORT+5 and PORT+6 there); a loopback HOST binds to it only")
    eng.add_argument("--moe-backend", choices=["epmoe", "fused", "auto"], default="epmoe",
                     help="Qwen3-MoE: sglang-jax's expert layout (default: %(default)s, sglang-jax's own; fused "
                          "is a TPU kernel); the swap maps to whichever the engine uses")
    return p.parse_args(argv)


class RunConfig(argparse.Namespace):
    """The run's settings: the flags (same names), with every default that depends on another flag resolved
    (run_config, before anything starts), then the facts only the run can know filled in once (resolved(),
    in run(): the mesh size, the demo's checkpoint folder, the chat-wrapped prompt) before the engine starts.
    Frozen: nothing changes it afterwards."""

    def __init__(self, **settings):
        for name, value in settings.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"RunConfig is frozen ({name}): run_config() and resolved() make it")

    def resolved(self, **facts) -> RunConfig:
        return RunConfig(**{**vars(self), **facts})


def run_config(args: argparse.Namespace) -> RunConfig:
    """The flags as parsed -> the run's frozen settings. --demo: 4 virtual CPU devices unless --device names
    another platform (then all its devices), both oracles, --keep-param-dict --verify-param-sharing, 1 MB
    buckets (its 11 MB of params would fit one default bucket)."""
    derived = {"bucket_mb": DEFAULT_BUCKET_MB if args.bucket_mb is None else args.bucket_mb,
               "trainer_sharding": args.trainer_sharding or ("fsdp" if args.weights_source == "trainer" else None)}
    if args.demo:
        device = args.device or "cpu"
        derived.update(device=device, tp_size=args.tp_size or (4 if device == "cpu" else 0),
                       bucket_mb=1.0 if args.bucket_mb is None else args.bucket_mb, keep_param_dict=True,
                       verify_param_sharing=True, verify_weights=True, verify_logits=True)
    return RunConfig(**{**vars(args), **derived})


# ----------------------------------------------------------------------------------------------
# Phase log: one JSON object per phase on stdout (and --json-out), with memory
# ----------------------------------------------------------------------------------------------


def process_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def device_buffers(arr, wait: bool = True) -> list[tuple[Any, Any, int]]:
    """(device, buffer pointer, bytes) of each addressable shard. Reads the per-device arrays without
    `addressable_shards`: its cached Shard list keeps the buffers alive past the array's death until the next gc.collect(),
    and a swap that should free the dummy set as it goes would seem (and be) two sets at its peak.
    wait=False: a shard still being computed (a forward in flight in another thread) is not waited for, its
    pointer is ("pending", id(arr), i): JAX 0.11's CPU client blocks in unsafe_buffer_pointer() until the shard
    is ready, holding the GIL, which the thread computing it needs (the serving demo hung so)."""
    out = []
    for i in range(len(arr.sharding.addressable_devices)):
        data = arr.addressable_data(i)
        ptr = data.unsafe_buffer_pointer() if wait or data.is_ready() else ("pending", id(arr), i)
        out.append((next(iter(data.devices())), ptr, data.nbytes))
    return out


WALK_TRIES = 3  # live-array walks per sample when a forward in another thread donates a buffer mid-walk


def live_array_bytes_per_device() -> dict[Any, int]:
    """Bytes of the unique device buffers of jax.live_arrays(), per device (CPU has no memory_stats).

    While the scheduler serves, a forward in its thread donates the KV cache (jit donate_argnames) at any moment,
    also between the snapshot of live arrays and the read of one array's buffers: reading that array then raises
    "Array has been deleted" (its shard's buffer is gone; is_deleted() can still say no for a moment) or a
    TypeError (its buffer list went away mid-read). Such an array is skipped, never an error (its memory now
    belongs to the forward's output), and the walk is taken again, at most WALK_TRIES times, until one sees no
    donation: the sample is then one consistent set of buffers (tests/meter_race_probe.py). A shard still being
    computed is counted without waiting for it (device_buffers(wait=False))."""
    import jax

    for _ in range(WALK_TRIES):
        seen: set[tuple[int, int]] = set()
        per_device: dict[Any, int] = {d: 0 for d in jax.local_devices()}
        donated = 0
        for arr in jax.live_arrays():
            try:
                buffers = [] if arr.is_deleted() else device_buffers(arr, wait=False)
            except (RuntimeError, TypeError) as e:  # XlaRuntimeError is a RuntimeError
                if not (arr.is_deleted() or "deleted" in str(e) or "donated" in str(e)):
                    raise
                donated += 1
                continue
            for device, ptr, nbytes in buffers:
                if (device.id, ptr) not in seen:
                    seen.add((device.id, ptr))
                    per_device[device] = per_device.get(device, 0) + nbytes
        if not donated:
            break
    return per_device


def memory_summary(per_device: list[dict]) -> dict[str, int]:
    """Sum, min and max over devices of each figure every device has."""
    summary: dict[str, int] = {}
    for key in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit"):
        values = [s[key] for s in per_device if key in s]
        if len(values) == len(per_device):
            summary.update({f"{key}_sum": sum(values), f"{key}_min": min(values), f"{key}_max": max(values)})
    return summary


def device_memory(collect: bool = True) -> dict:
    import jax

    if collect:
        gc.collect()
    devices = jax.local_devices()  # this host's (a multi-host phase line sums every host's: Hosts.memory)
    stats = [d.memory_stats() for d in devices]
    if all(s for s in stats):
        source = "memory_stats"
        per_device = [{"device": str(d), **{k: int(v) for k, v in s.items() if isinstance(v, (int, float))}}
                      for d, s in zip(devices, stats, strict=True)]
    else:
        source = "live_arrays"
        in_use = live_array_bytes_per_device()
        per_device = [{"device": str(d), "bytes_in_use": in_use.get(d, 0)} for d in devices]
    return {"process_rss_bytes": process_rss_bytes(),
            "process_rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "jax_device_memory_stats": per_device,
            "jax_device_memory_summary": memory_summary(per_device), "source": source}


def bytes_in_use_sum(mem: dict) -> int:
    return mem["jax_device_memory_summary"]["bytes_in_use_sum"]


# ----------------------------------------------------------------------------------------------
# Several hosts (--nnodes): one process per host; every rank agrees at each step and exits alike
# ----------------------------------------------------------------------------------------------

HOST_END_WAIT_S = 120.0  # how long a finished rank waits for the others' verdicts before exiting alone
HOST_ERROR_GRACE_S = 10.0  # how long a rank's main thread has to notice another rank's failure itself
LOST_HINT = ("the host died (OOM-killed, preempted, kill -9) or hangs: see its log and `dmesg` there; the other "
             "ranks exited (3) without waiting for it; --host-lost-after sets how long a rank may be silent")


class Hosts:
    """The processes of a multi-host slice (--nnodes: one per host, JAX multi-controller); rank 0 prints the
    phase JSON. Every collective step of a run (agree) is a round on the key-value store of JAX's coordination
    service with a bounded wait, never a device collective: one launched by the main thread could interleave
    with a forward that a scheduler thread runs, and deadlock. A failure on any rank is published (fail) and
    ends every rank with that error line and exit code: at its next step, or through the watcher thread
    within HOST_ERROR_GRACE_S when a rank is busy elsewhere. A rank that dies without a word (OOM-killed,
    preempted, kill -9) stops its heartbeat: within lost_after seconds every other rank ends with one error
    line naming it and the phase it was in (stage hosts, exit 3), long before JAX's coordination service
    (100 s, then a fatal log and no JSON). One host (the default): every step returns at once.

    The API in a multi-host RL loop: HOSTS.start(nnodes, rank, "HOST:PORT", timeout_s, platform) before
    anything else touches JAX, then start_engine(...) and ParamSwapper as on one host (docs/api.md)."""

    KEY = "run_param_swap"

    def __init__(self):
        self.nnodes, self.rank, self.timeout_s = 1, 0, 1800.0
        self.client = None
        self.step = 0
        self.handled = threading.Event()  # this rank has turned a failure into its error line (or is ending)
        self.on_failure = None  # called with another rank's failure when the main thread has not seen it
        self.lost_after = DEFAULT_HOST_LOST_S
        self.lost: ToolError | None = None  # set by the watcher: a rank (or the coordination service) is gone
        self.seen: dict[int, tuple[Any, float, str]] = {}  # rank -> (its last beat, when it changed, its phase)
        self.doing = lambda: ""  # this rank's phase in progress, sent with its heartbeat (the CLI: PhaseLog.doing)

    @property
    def multi(self) -> bool:
        return self.nnodes > 1

    def start(self, nnodes: int, rank: int, addr: str | None, timeout_s: float, platform: str,
              lost_after: float = DEFAULT_HOST_LOST_S) -> None:
        """jax.distributed.initialize (before anything else touches JAX), then the watcher (failures and
        heartbeats)."""
        self.nnodes, self.rank, self.timeout_s, self.lost_after = nnodes, rank, timeout_s, lost_after
        if nnodes == 1:
            return
        import jax
        from jax._src import distributed

        if platform == "cpu":  # cross-process collectives of CPU devices
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        host = addr.rsplit(":", 1)[0]
        bind = addr if host in ("127.0.0.1", "localhost", "::1") else None  # else JAX binds every interface
        wait = int(min(timeout_s, 300))
        hint = ("start the same command on every host within the timeout (min(--watchdog-timeout, 300 s)), with "
                "the same --dist-init-addr: rank 0's address and a free port")
        # JAX ends the process with a fatal log (no Python exception) when a host does not join in time: say it first
        late = threading.Timer(max(1.0, wait - 2.0), lambda: self.on_failure and self.on_failure(ToolError(
            "hosts", f"not every one of the {nnodes} hosts joined {addr} within {wait} s", hint, EXIT_ENGINE)))
        late.daemon = True
        late.start()
        try:
            jax.distributed.initialize(addr, nnodes, rank, initialization_timeout=wait,
                                       coordinator_bind_address=bind, shutdown_timeout_seconds=60)
        except Exception as e:  # noqa: BLE001 - JAX's errors (a port in use, a bad address) become one error line
            raise ToolError("hosts", f"jax.distributed.initialize({addr}, {nnodes}, {rank}) failed: "
                            f"{type(e).__name__}: {str(e).splitlines()[0]}", hint, EXIT_ENGINE) from e
        finally:
            late.cancel()
        self.client = distributed.global_state.client
        now = time.monotonic()
        self.seen = {r: (None, now, "jax_ready") for r in range(nnodes) if r != rank}
        threading.Thread(target=self.beat, name="param-swap-heartbeat", daemon=True).start()
        threading.Thread(target=self.watch, name="param-swap-hosts", daemon=True).start()

    def agree(self, name: str, value: Any = None) -> list:
        """Every rank's `value` (JSON) at this step, in rank order. Raises the first failure another rank
        published, a ToolError when a rank does not come within timeout_s, or when the ranks are at different
        steps (they run different code)."""
        if not self.multi:
            return [value]
        self.step += 1
        key = f"{self.KEY}/{self.step}/"
        self.client.key_value_set(key + str(self.rank), json.dumps({"name": name, "value": value}, default=str))
        got = self.gather(key, self.timeout_s, name)
        names = {r: v["name"] for r, v in got.items()}
        if len(set(names.values())) > 1:
            raise ToolError("hosts", f"the ranks are at different steps: {names}",
                            "every host must run the same command (same flags and checkpoint)", EXIT_ENGINE)
        return [got[r]["value"] for r in range(self.nnodes)]

    def gather(self, key: str, timeout_s: float, name: str, errors: bool = True) -> dict[int, Any]:
        """Every rank's value under `key` (errors=False: every rank's that is not lost)."""
        deadline, pause = time.monotonic() + timeout_s, 0.002
        while True:
            got = {int(k.rsplit("/", 1)[1]): json.loads(v) for k, v in self.kv_dir(key, name)}
            gone = set(self.lost.details["lost_ranks"]) if self.lost is not None and not errors else set()
            if len(set(got) | gone) == self.nnodes:
                return got
            if errors and self.lost is not None:
                raise self.lost
            if errors and (failure := self.failure()):
                raise failure
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.nnodes)) - set(got))
                raise ToolError("hosts", f"rank(s) {missing} did not reach '{name}' within {timeout_s:.0f} s",
                                "a host is stuck or gone: see its log (--watchdog-timeout bounds each wait)",
                                EXIT_ENGINE, missing_ranks=missing)
            time.sleep(pause)
            pause = min(2 * pause, 0.1)  # a long wait (another rank generating) polls the coordinator gently

    def fail(self, error: ToolError) -> None:
        """Publish this rank's failure (not one it learnt from another rank) so that every rank ends with it."""
        self.handled.set()
        if self.client is not None and error.details.get("failed_rank", self.rank) == self.rank:
            record = {**error.record(), "failed_rank": self.rank}
            self.client.key_value_set(f"{self.KEY}/error/{self.rank}", json.dumps(record, default=str),
                                      allow_overwrite=True)

    def kv_dir(self, key: str, name: str) -> list:
        """The key-value store's entries under `key`; the coordination service gone (rank 0's process died):
        the error line that says so, not JAX's exception."""
        try:
            return self.client.key_value_dir_get(key)
        except Exception as e:  # noqa: BLE001 - JAX's RPC errors (UNAVAILABLE, ...) become one error line
            raise self.lost or ToolError("hosts", f"the coordination service (rank 0) is unreachable at '{name}': "
                                         f"{type(e).__name__}: {str(e).splitlines()[0]}", LOST_HINT, EXIT_ENGINE,
                                         lost_ranks=[0], failed_rank=0) from e

    def failure(self) -> ToolError | None:
        """The lowest rank's published failure, as this rank's error (same stage, exit code), or None."""
        found = sorted((int(k.rsplit("/", 1)[1]), json.loads(v)) for k, v in self.kv_dir(f"{self.KEY}/error/", "error"))
        if not found:
            return None
        rank, record = found[0]
        details = {k: v for k, v in record.items() if k not in ("phase", "stage", "error", "hint", "exit_code")}
        return ToolError(record["stage"], f"rank {rank}: {record['error']}", record["hint"], record["exit_code"],
                         **details)

    def beat(self) -> None:
        """This rank's heartbeat, every HEARTBEAT_S until the process exits (also while it ends: a rank that
        finished first must not look lost to one still finishing), with the phase it is in."""
        count = 0
        while True:
            count += 1
            try:
                self.client.key_value_set(f"{self.KEY}/alive/{self.rank}", json.dumps([count, self.doing()]),
                                          allow_overwrite=True)
            except Exception:  # noqa: BLE001 - the coordination service is gone: the watcher says so
                return
            time.sleep(HEARTBEAT_S)

    def watch(self) -> None:
        """Every HEARTBEAT_S: the other ranks' heartbeats and published failures. Ends this rank when another
        rank failed and the main thread does not notice (it is inside the engine's start, a generation, a
        checkpoint read): within HOST_ERROR_GRACE_S; when a rank is lost (no heartbeat for lost_after s,
        or the coordination service unreachable as long): at once (the main thread's step raises it)."""
        reachable = time.monotonic()
        while not self.handled.is_set():
            try:
                lost = self.silent(self.kv_dir(f"{self.KEY}/alive/", "heartbeat"))
                failure = self.failure()
                reachable = time.monotonic()
            except ToolError as e:  # the coordination service is gone
                lost, failure = (e if time.monotonic() - reachable > self.lost_after else None), None
            if lost is not None:
                self.lost = lost
                if not self.handled.wait(2 * HEARTBEAT_S) and self.on_failure is not None:
                    self.on_failure(lost)
                return
            if failure is not None and failure.details["failed_rank"] != self.rank:
                if not self.handled.wait(HOST_ERROR_GRACE_S) and self.on_failure is not None:
                    self.on_failure(failure)
                return
            time.sleep(HEARTBEAT_S)

    def silent(self, beats: list) -> ToolError | None:
        """The error naming the ranks whose heartbeat has not changed for lost_after seconds, or None."""
        now = time.monotonic()
        for k, v in beats:
            r, (count, phase) = int(k.rsplit("/", 1)[1]), json.loads(v)
            if r in self.seen and self.seen[r][0] != count:
                self.seen[r] = (count, now, phase)
        gone = sorted(r for r, (_, when, _) in self.seen.items() if now - when > self.lost_after)
        if not gone:
            return None
        phases = {r: self.seen[r][2] for r in gone}
        here = f", while this rank was in {self.doing()}" if self.doing() else ""
        return ToolError("hosts", "rank(s) " + ", ".join(f"{r}" + (f" (in {phases[r]})" if phases[r] else "")
                                                         for r in gone)
                         + f" stopped answering: no heartbeat for {self.lost_after:.0f} s{here}", LOST_HINT,
                         EXIT_ENGINE, lost_ranks=gone, lost_in_phase=phases, failed_rank=gone[0])

    def lost_since(self, t: float) -> ToolError | None:
        """After a failure here that a lost rank can cause (a forward's collective failed: the scheduler's
        SIGQUIT): the lost rank's error, or None once every other rank's heartbeat has changed since monotonic
        time t (they are alive). Waits at most lost_after and a few heartbeats."""
        if self.client is None:
            return None
        deadline = t + self.lost_after + 4 * HEARTBEAT_S
        while time.monotonic() < deadline and self.lost is None:
            if all(when > t for _, when, _ in self.seen.values()):
                return None
            time.sleep(HEARTBEAT_S / 2)
        return self.lost

    def end(self, code: int, failed_checks: list[str]) -> tuple[int, list[dict]]:
        """The last step: every rank's exit code and failed checks; the common exit code (an error's, else 1
        if any check failed anywhere, else 0). A rank that does not come within HOST_END_WAIT_S is named."""
        mine = {"rank": self.rank, "exit_code": code, "failed_checks": failed_checks}
        if self.client is None:  # one host, or the hosts never connected
            return code, [mine]
        self.handled.set()
        key = f"{self.KEY}/end/"
        try:
            self.client.key_value_set(key + str(self.rank), json.dumps(mine))
            got = self.gather(key, HOST_END_WAIT_S, "end", errors=False)
        except Exception:  # noqa: BLE001 - a rank missing (ToolError), or the coordination service gone: ours only
            got = {self.rank: mine}
        hosts = [got.get(r) or {"rank": r, "exit_code": None, "failed_checks": None, "lost": True}
                 for r in range(self.nnodes)]
        if len(got) < self.nnodes:
            return max(code, EXIT_ENGINE), hosts
        codes = [h["exit_code"] for h in hosts]
        errors = [c for c in codes if c not in (EXIT_OK, EXIT_CHECK_FAILED)]
        return (errors[0] if errors else max(codes)), hosts

    def shutdown(self) -> None:
        """jax.distributed.shutdown (every rank leaves together: one that just exits makes JAX abort the others);
        not with a rank lost (its barrier would wait for it: 60 s)."""
        if self.client is not None and self.lost is None:
            import jax

            try:
                jax.distributed.shutdown()
            except Exception as e:  # noqa: BLE001 - exiting anyway; said, not hidden
                log(f"jax.distributed.shutdown: {type(e).__name__}: {e}")

    def memory(self, mem: dict) -> dict:
        """A phase's memory sample: this host's on one host; with several, every host's devices (rank order),
        the summary over all of them, and per-host figures (hosts)."""
        if not self.multi:
            return mem
        samples = self.agree("memory", mem)
        per_device = [d for m in samples for d in m["jax_device_memory_stats"]]
        hosts = [{"rank": r, "bytes_in_use_sum": m["jax_device_memory_summary"].get("bytes_in_use_sum"),
                  "process_rss_bytes": m["process_rss_bytes"]} for r, m in enumerate(samples)]
        return {**mem, "jax_device_memory_stats": per_device, "jax_device_memory_summary": memory_summary(per_device),
                "hosts": hosts}

    def from_rank0(self, name: str, value: Any = None) -> Any:
        """Rank 0's `value` on every rank (e.g. its generation's answer)."""
        return self.agree(name, value if self.rank == 0 else None)[0]


HOSTS = Hosts()  # one host unless HOSTS.start(...) (jax_ready, from --nnodes)


def strict_json(record: dict) -> str:
    """One line of strict JSON (RFC 8259: no NaN or Infinity tokens, which json.dumps writes by default and
    strict parsers refuse): a non-finite float becomes null, and the record names each such field and what it
    was (nonfinite_fields, e.g. {"logits.max_abs_logprob_diff": "nan"})."""
    found: dict[str, str] = {}

    def clean(value, where: str):
        if isinstance(value, (float, np.floating)):
            if math.isfinite(value):
                return float(value)
            found[where] = str(float(value))
            return None
        if isinstance(value, Mapping):
            return {k: clean(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    out = clean(record, "")
    if found:
        out["nonfinite_fields"] = found
    return json.dumps(out, default=str, allow_nan=False)


class PhaseLog:
    """Prints one JSON line per phase on stdout and in --json-out (strict JSON); keeps them for the summary."""

    def __init__(self, json_out: str | None):
        self.t0 = time.perf_counter()
        self.records: list[dict] = []
        self.checks: dict[str, dict] = {}
        self.answers: list[tuple[str, dict]] = []  # (phase, generate_greedy()'s answer) of every generation
        self.file = open(json_out, "w") if json_out else None
        self.sinks: list = []  # e.g. WandbSink: each gets every record
        self.doing = "start"  # the phase in progress (begin()), named if a signal stops the run
        self.lock = threading.RLock()  # the Stopper's lines never interleave with a phase's
        self.closed = False  # set by finish(): the run is over, nothing more is written
        self.stopper = None  # the Stopper: main() sets it

    def begin(self, name: str) -> None:
        self.doing = name

    def write(self, record: dict) -> dict:
        with self.lock:
            if not self.closed:
                self.emit(record)
        return record

    def emit(self, record: dict) -> None:
        line = strict_json(record)
        if HOSTS.rank == 0:
            print(line, flush=True)
        else:  # rank 0 prints the phase JSON of a multi-host run; the others a short log (and --json-out)
            log(f"rank {HOSTS.rank}: {record['phase']}" + (f" ({record['stage']}: {record['error']})"
                                                          if record["phase"] == "error" else ""))
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()
        self.records.append(record)
        for sink in self.sinks:
            sink.log(record)

    def phase(self, name: str, sample_memory: bool = True, **fields) -> dict:
        """One phase line. sample_memory: with a device memory sample (`memory`): a swap's report carries its
        own (taken while generation was paused), else one is taken now; several hosts: all of them."""
        record = {"phase": name, "elapsed_s": round(time.perf_counter() - self.t0, 3), **fields}
        if sample_memory:
            record["memory"] = HOSTS.memory(record.get("memory") or device_memory())
        return self.write(record)

    def check(self, name: str, ok: bool, **details) -> bool:
        self.checks[name] = {"ok": bool(ok), **details}
        log(f"check {name}: {'ok' if ok else 'FAILED'}")
        return bool(ok)

    def memory_of(self, phase: str) -> int | None:
        for r in self.records:
            if r["phase"] == phase and "memory" in r:
                return bytes_in_use_sum(r["memory"])
        return None


# ----------------------------------------------------------------------------------------------
# Phase 1: JAX up (platform chosen before JAX starts)
# ----------------------------------------------------------------------------------------------


def validate_args(cfg: RunConfig) -> None:
    """Usage errors, found before JAX or the engine start."""
    problems = []
    if not cfg.prompt:
        problems.append(("--prompt is empty", "give a non-empty prompt: the check compares generated tokens"))
    if cfg.max_new_tokens < 1:
        problems.append((f"--max-new-tokens {cfg.max_new_tokens} < 1", "generate at least one token"))
    if cfg.tp_size < 0:
        problems.append((f"--tp-size {cfg.tp_size} < 0", "0 means all devices"))
    if cfg.dp_size != 1:
        problems.append((f"--dp-size {cfg.dp_size}: only 1 is supported",
                         "sglang-jax's single-process engine (which the in-place swap needs) runs dp_size 1"))
    if cfg.rounds < 0:
        problems.append((f"--rounds {cfg.rounds} < 0", "0 turns rounds off"))
    if cfg.arch != "qwen2" and not cfg.demo:
        problems.append((f"--arch {cfg.arch} without --demo", "--arch picks the family of the demo checkpoint; "
                         "a real checkpoint's config.json names its own"))
    if cfg.serve_load < 0:
        problems.append((f"--serve-load {cfg.serve_load} < 0", "0 turns the load off"))
    if not cfg.serve_seconds > 0:
        problems.append((f"--serve-seconds {cfg.serve_seconds} <= 0", "seconds per requests/s window, e.g. 10"))
    if cfg.weights_source != "trainer" and (cfg.alias or cfg.trainer_sharding):
        problems.append(("--alias and --trainer-sharding need --weights-source trainer",
                         "a host tree is always copied to the devices"))
    if cfg.max_running_requests < cfg.dp_size:
        problems.append((f"--max-running-requests {cfg.max_running_requests} < --dp-size {cfg.dp_size}",
                         "sglang-jax needs at least one running request per data-parallel rank"))
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
        unsupported = [f for f, on in (("--demo", cfg.demo), ("--weights-source torch", cfg.weights_source == "torch"))
                       if on]
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


def configure_platform(cfg: RunConfig) -> str:
    """Pick the platform and, for cpu, ask XLA for --tp-size virtual devices. Must run before JAX starts."""
    env_platform = os.environ.get("JAX_PLATFORMS", "")
    if cfg.device and env_platform and env_platform != cfg.device:
        raise ToolError("arguments", f"--device {cfg.device} conflicts with JAX_PLATFORMS={env_platform}",
                        "unset JAX_PLATFORMS or make it equal to --device (sglang-jax asserts they match)")
    device = cfg.device or env_platform or ""
    if cfg.device == "cpu" and cfg.tp_size > 0:
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
        count = cfg.tp_size * cfg.dp_size // cfg.nnodes  # this host's share of the mesh
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    if device:
        os.environ["JAX_PLATFORMS"] = device
    return device


def skip_torch_unless_needed(cfg: RunConfig) -> None:
    """transformers (which sglang-jax and this tool import for configs and tokenizers) imports torch, its
    compiler and scikit-learn whenever torch is installed: ~6 s of the ~11 s that importing sglang-jax takes
    here. Only --verify-logits and --weights-source torch use torch; otherwise transformers' own switch
    USE_TORCH=0 leaves it out (a USE_TORCH the caller set is kept). Must run before transformers is imported."""
    if not (cfg.verify_logits or cfg.weights_source == "torch"):
        os.environ.setdefault("USE_TORCH", "0")


def jax_ready(phases: PhaseLog, cfg: RunConfig) -> tuple[str, int]:
    """Phase 1: JAX's devices (several hosts: the coordination service first). Returns the platform and the
    tensor-parallel size (--tp-size 0: every device)."""
    phases.begin("jax_ready")
    import jax

    HOSTS.start(cfg.nnodes, cfg.node_rank, cfg.dist_init_addr, cfg.watchdog_timeout,  # before JAX's backend
                cfg.device or os.environ.get("JAX_PLATFORMS", ""), cfg.host_lost_after)
    device = cfg.device or os.environ.get("JAX_PLATFORMS") or jax.default_backend()
    devices = jax.devices()
    tp = cfg.tp_size or len(devices) // cfg.dp_size
    if tp * cfg.dp_size != len(devices):
        raise ToolError("arguments", f"tp_size x dp_size = {tp} x {cfg.dp_size} != {len(devices)} devices",
                        "pass --tp-size and --dp-size whose product is jax.device_count() (on CPU, --device cpu "
                        "makes --tp-size virtual devices)")
    phases.phase("jax_ready", jax_version=jax.__version__, backend=jax.default_backend(), device=device,
               device_count=len(devices), devices=[str(d) for d in devices], tp_size=tp, dp_size=cfg.dp_size,
               nnodes=HOSTS.nnodes, local_devices=[str(d) for d in jax.local_devices()])
    return device, tp


# ----------------------------------------------------------------------------------------------
# The checkpoint: where it is, and whether it is a model family this tool can swap
# ----------------------------------------------------------------------------------------------


def resolve_checkpoint(model_id: str, download_dir: str | None) -> str:
    """Local folder as is; otherwise a hub snapshot (config, tokenizer, safetensors) into the HF cache."""
    if os.path.isdir(model_id):
        return os.path.abspath(model_id)
    if model_id.startswith((".", "/", "~")) or os.path.exists(model_id):
        raise ToolError("checkpoint", f"local checkpoint folder {model_id!r} does not exist",
                        "pass a folder with config.json and *.safetensors, or a hub id like Qwen/Qwen2.5-3B-Instruct")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model_id, cache_dir=download_dir,
                                 allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"])
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear error line
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or "connect" in str(e).lower() \
            or type(e).__name__ in ("LocalEntryNotFoundError", "ConnectionError", "ConnectTimeout")
        what = "the hub cannot be reached (offline) and the HF cache does not have it" if offline else "hub error"
        raise ToolError("checkpoint", f"cannot fetch {model_id!r}: {what}: {type(e).__name__}: {str(e)[:300]}",
                        "download it where the hub is reachable (huggingface-cli download ... --local-dir DIR) and "
                        "pass --model-id DIR, or check the id") from e


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    path: str
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    files: tuple[str, ...]
    context_len: int = 0  # max_position_embeddings: sglang-jax refuses prompt + new tokens beyond it
    biases: tuple[str, ...] = ("q", "k", "v")  # projections with a bias
    qk_norm: bool = False
    moe_layers: tuple[int, ...] = ()  # layers whose MLP is a router + experts (Qwen3-MoE)
    num_experts: int = 0
    moe_intermediate_size: int = 0


CONFIG_FIELDS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
                 "intermediate_size", "vocab_size", "max_position_embeddings")


def engine_view_of_config(path: str, raw: dict, family: Family) -> dict:
    """The sizes as the ENGINE sees them: config.json through transformers' AutoConfig, as sglang-jax reads
    it, with every default it fills in (a missing num_key_value_heads is 32 in Qwen2Config, not the number of
    attention heads). Bad or inconsistent values are exit 2, naming the field, before anything starts."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - transformers' own message names what is wrong
        raise ToolError("checkpoint", f"transformers cannot read {path}/config.json: {type(e).__name__}: {e}",
                        "fix config.json (sglang-jax reads it the same way)") from e
    values = {f: getattr(cfg, f, None) for f in CONFIG_FIELDS}
    head_dim = getattr(cfg, "head_dim", None)
    problems = [f"{f} = {v!r} (from config.json)" if f in raw else f"{f} = {v!r} (absent from config.json: "
                "the default transformers assumes)" for f, v in values.items()
                if not isinstance(v, int) or isinstance(v, bool) or v < 1]
    problems += [] if head_dim is None or (isinstance(head_dim, int) and head_dim > 0) else [f"head_dim = {head_dim!r}"]
    if not problems:
        heads, kv = values["num_attention_heads"], values["num_key_value_heads"]
        if heads % kv:
            why = "" if "num_key_value_heads" in raw else \
                " (config.json has no num_key_value_heads: transformers assumes " + str(kv) + ")"
            problems.append(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}{why}")
        if head_dim is None and values["hidden_size"] % heads:
            problems.append(f"hidden_size {values['hidden_size']} is not a multiple of num_attention_heads {heads} "
                            "(and config.json gives no head_dim)")
        if getattr(cfg, "mlp_bias", False):
            problems.append("mlp_bias is true: sglang-jax's model has no MLP biases")
    if problems:
        raise ToolError("checkpoint", f"config.json as the engine reads it: {'; '.join(problems)}",
                        "fix config.json: sglang-jax would fail inside its scheduler on these values")
    heads = values["num_attention_heads"]
    biases = ("q", "k", "v") if family.biases == "qkv" else ("q", "k", "v", "o") if getattr(
        cfg, "attention_bias", False) else ()
    moe = {}
    if family.moe:  # sglang-jax makes every layer sparse but config's mlp_only_layers (decoder_sparse_step unused)
        dense = set(getattr(cfg, "mlp_only_layers", None) or [])
        moe = dict(moe_layers=tuple(i for i in range(values["num_hidden_layers"]) if i not in dense),
                   num_experts=int(getattr(cfg, "num_experts", 0)),
                   moe_intermediate_size=int(getattr(cfg, "moe_intermediate_size", 0)))
        if moe["num_experts"] < 1 or moe["moe_intermediate_size"] < 1:
            raise ToolError("checkpoint", f"config.json: num_experts {moe['num_experts']}, moe_intermediate_size "
                            f"{moe['moe_intermediate_size']}", "a Qwen3-MoE config needs both positive")
    return dict(biases=biases, qk_norm=family.qk_norm, **moe,
                num_layers=values["num_hidden_layers"], num_heads=heads, num_kv_heads=values["num_key_value_heads"],
                head_dim=head_dim or values["hidden_size"] // heads, hidden_size=values["hidden_size"],
                intermediate_size=values["intermediate_size"], vocab_size=values["vocab_size"],
                tie_word_embeddings=bool(cfg.tie_word_embeddings), context_len=values["max_position_embeddings"])


def read_checkpoint_info(path: str) -> CheckpointInfo:
    config_file = os.path.join(path, "config.json")
    try:
        with open(config_file) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ToolError("checkpoint", f"cannot read {config_file}: {e}", "the folder needs a valid HF config.json") from e
    if not isinstance(cfg, dict):
        raise ToolError("checkpoint", f"{config_file} is not a JSON object", "the folder needs a valid HF config.json")
    archs = cfg.get("architectures")
    archs = archs if isinstance(archs, list) and archs else [cfg.get("model_type", "?")]
    if archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ToolError("checkpoint", f"architecture {archs[0]!r} is not supported",
                        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)} (Qwen2/Qwen2.5, Qwen3, Llama 2/3, Qwen3-MoE)")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = tuple(sorted(set(json.load(f)["weight_map"].values())))
    else:
        files = tuple(sorted(n for n in os.listdir(path) if n.endswith(".safetensors")))
    if not files:
        raise ToolError("checkpoint", f"no *.safetensors files in {path}", "the tool reads safetensors checkpoints")
    return CheckpointInfo(path=path, architecture=archs[0], files=files,
                          **engine_view_of_config(path, cfg, FAMILIES[archs[0]]))


# The tensors a checkpoint must hold, with their HF shapes in config terms, and when (None: always).
CHECKPOINT_TENSORS = [  # (name (layer i as {i}), shape, when)
    ("model.embed_tokens.weight", ("vocab", "hidden"), None),
    ("model.norm.weight", ("hidden",), None),
    ("lm_head.weight", ("vocab", "hidden"), "untied"),
    ("model.layers.{i}.input_layernorm.weight", ("hidden",), None),
    ("model.layers.{i}.post_attention_layernorm.weight", ("hidden",), None),
    ("model.layers.{i}.self_attn.q_proj.weight", ("q", "hidden"), None),
    ("model.layers.{i}.self_attn.q_proj.bias", ("q",), "q_bias"),
    ("model.layers.{i}.self_attn.k_proj.weight", ("kv", "hidden"), None),
    ("model.layers.{i}.self_attn.k_proj.bias", ("kv",), "k_bias"),
    ("model.layers.{i}.self_attn.v_proj.weight", ("kv", "hidden"), None),
    ("model.layers.{i}.self_attn.v_proj.bias", ("kv",), "v_bias"),
    ("model.layers.{i}.self_attn.o_proj.weight", ("hidden", "q"), None),
    ("model.layers.{i}.self_attn.o_proj.bias", ("hidden",), "o_bias"),
    ("model.layers.{i}.self_attn.q_norm.weight", ("head_dim",), "qk_norm"),
    ("model.layers.{i}.self_attn.k_norm.weight", ("head_dim",), "qk_norm"),
    ("model.layers.{i}.mlp.gate_proj.weight", ("intermediate", "hidden"), "dense"),
    ("model.layers.{i}.mlp.up_proj.weight", ("intermediate", "hidden"), "dense"),
    ("model.layers.{i}.mlp.down_proj.weight", ("hidden", "intermediate"), "dense"),
    ("model.layers.{i}.mlp.gate.weight", ("experts", "hidden"), "moe"),  # the router
    ("model.layers.{i}.mlp.experts.{e}.gate_proj.weight", ("moe_intermediate", "hidden"), "moe"),
    ("model.layers.{i}.mlp.experts.{e}.up_proj.weight", ("moe_intermediate", "hidden"), "moe"),
    ("model.layers.{i}.mlp.experts.{e}.down_proj.weight", ("hidden", "moe_intermediate"), "moe"),
]


def expected_tensors(info: CheckpointInfo) -> dict[str, tuple[int, ...]]:
    dims = {"vocab": info.vocab_size, "hidden": info.hidden_size, "intermediate": info.intermediate_size,
            "q": info.num_heads * info.head_dim, "kv": info.num_kv_heads * info.head_dim, "head_dim": info.head_dim,
            "experts": info.num_experts, "moe_intermediate": info.moe_intermediate_size}
    holds = {"untied": not info.tie_word_embeddings, "qk_norm": info.qk_norm,
             **{f"{p}_bias": p in info.biases for p in "qkvo"}}
    out = {}
    for name, shape, when in CHECKPOINT_TENSORS:
        for i in range(info.num_layers) if "{i}" in name else [None]:
            moe_layer = i in info.moe_layers
            if when == "dense" and moe_layer or when == "moe" and not moe_layer or holds.get(when, True) is False:
                continue
            for e in range(info.num_experts) if "{e}" in name else [None]:
                out[name.format(i=i, e=e)] = tuple(dims[d] for d in shape)
    return out


HF_IGNORED = (r".*rotary_emb\.inv_freq",)  # buffers some exports carry; not parameters


def host_dtype(name: str):
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def safetensors_entry(name: str, meta, data: np.ndarray, data_start: int) -> np.ndarray:
    """One header entry as a zero-copy view of the mapped file, after checking every field of it: a float
    dtype, a shape of non-negative ints, offsets inside the file that span exactly shape x itemsize bytes."""
    if not isinstance(meta, dict):
        raise ValueError(f"{name}: header entry {meta!r:.60} is not an object")
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"{name}: dtype {str(dtype)[:20]} (floats only: {', '.join(SAFETENSORS_DTYPES)})")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise ValueError(f"{name}: shape {shape!r:.40} is not a list of non-negative ints")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and not isinstance(o, bool)
                                                                     for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"{name}: data_offsets {offsets!r:.40} are not [start, end] with 0 <= start <= end")
    start, end = (data_start + o for o in offsets)
    itemsize = host_dtype(SAFETENSORS_DTYPES[dtype]).itemsize
    if end - start != int(np.prod(shape)) * itemsize:
        raise ValueError(f"{name}: {end - start} bytes for shape {shape} of {dtype}")
    if end > data.size:
        raise ValueError(f"{name} ends at byte {end}, the file has {data.size}")
    return np.asarray(data[start:end]).view(host_dtype(SAFETENSORS_DTYPES[dtype])).reshape(shape)




def read_safetensors(info: CheckpointInfo) -> dict[str, np.ndarray]:
    """Every tensor of the shards as a zero-copy numpy view of the file (np.memmap: the OS reads pages
    lazily, when placement touches them; bf16 as ml_dtypes.bfloat16). safetensors' own numpy loader copies
    every tensor into new memory; its format (8-byte header length, JSON header, raw data) is simple enough
    to map directly. Used both to validate the checkpoint (shapes only) and to read it."""
    import struct

    tensors: dict[str, np.ndarray] = {}
    for fname in info.files:
        full = os.path.join(info.path, fname)
        try:
            with open(full, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > os.path.getsize(full) - 8:
                    raise ValueError(f"header length {header_len} exceeds the file: not a safetensors file")
                header = json.loads(f.read(header_len))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            data = np.memmap(full, dtype=np.uint8, mode="r")
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                tensors[name] = safetensors_entry(name, meta, data, 8 + header_len)
        except (OSError, ValueError, KeyError, struct.error) as e:
            raise ToolError("checkpoint", f"cannot read {fname}: {type(e).__name__}: {e}",
                            "the file is missing, truncated or corrupt, or not a float checkpoint") from e
    return tensors


def validate_checkpoint(info: CheckpointInfo) -> None:
    """Map the files (no data is read) and check every tensor against the config: present, inside its file
    (not truncated), the right shape, a float dtype. Runs before the engine is started."""
    found = {name: tuple(arr.shape) for name, arr in read_safetensors(info).items()}
    expected = expected_tensors(info)
    ignored = [n for n in found if any(re.fullmatch(rx, n) for rx in HF_IGNORED)
               or (n == "lm_head.weight" and info.tie_word_embeddings)]
    problems = [f"{n}: missing" for n in expected if n not in found]
    problems += [f"{n}: unexpected tensor" for n in found if n not in expected and n not in ignored]
    problems += [f"{n}: shape {found[n]}, config says {shape}" for n, shape in expected.items()
                 if n in found and found[n] != shape]
    if problems:
        raise ToolError("checkpoint", f"{len(problems)} tensor(s) do not match config.json: " + "; ".join(problems[:5]),
                        "the checkpoint's files and its config.json disagree: re-download or re-export it")


def chat_prompt(path: str, prompt: str) -> str:
    """--chat: the prompt as one user message in the tokenizer's chat template, ready for the assistant."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.chat_template:
        raise ToolError("arguments", f"--chat: the tokenizer in {path} has no chat template",
                        "drop --chat (base checkpoints) or use an instruct checkpoint")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


LOAD_PROMPTS = [  # --serve-load: the clients' prompts (those sharing a first token with --prompt are left out)
    "Write a short poem about sharded arrays.",
    "List three reasons to pause generation before changing weights.",
    "Summarize the story of the lazy dog in two sentences.",
    "What does a radix cache store?",
    "Count from one to twenty in words.",
    "Describe a tensor parallel mesh of four devices.",
    "Why do rollout engines keep many requests in flight?",
    "Translate 'the weights were swapped' into French.",
]
def load_prompts(tokenizer, prompt: str) -> list[str]:
    """The load prompts whose first token differs from the checked prompt's: then no load request shares a
    cached prefix with it, and its answer after a swap is computed from scratch, like its reference."""
    first = tokenizer(prompt)["input_ids"][:1]
    return [p for p in LOAD_PROMPTS if tokenizer(p)["input_ids"][:1] != first]


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
        prompts = load_prompts(tokenizer, cfg.prompt)
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


def engine_dtype(cfg, info: CheckpointInfo) -> str:
    """The engine's dtype: --dtype, or with auto the checkpoint's (config.json torch_dtype; newer: dtype)."""
    if cfg.dtype != "auto":
        return cfg.dtype
    raw = json.load(open(os.path.join(info.path, "config.json")))
    return str(raw.get("torch_dtype") or raw.get("dtype") or "float32")


def validate_cpu_devices(cfg, info: CheckpointInfo, device: str, tp: int) -> None:
    """A float32 engine on more CPU virtual devices than this process has cores deadlocks in XLA's CPU all-reduce
    (measured, sglang-jax's own loader too: the first forward waits, and after 40 s XLA aborts the process,
    "Termination timeout for all reduce ... Expected 4 threads to join", exit 134 and no JSON line): 4 devices on
    2 cores, 2 on 1 core, every try. bfloat16 there, and float32 on as many devices as cores, run."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local = tp // cfg.nnodes  # this host's devices
    if device == "cpu" and local > cores and engine_dtype(cfg, info) == "float32":
        raise ToolError("arguments", f"a float32 engine on {local} CPU devices with {cores} core(s): XLA's CPU "
                        "all-reduce deadlocks there and aborts the process after 40 s",
                        f"use --dtype bfloat16, or --tp-size {cores} or less on this machine (docs/phases.md, "
                        "exit codes)", devices=local, cores=cores)


# ----------------------------------------------------------------------------------------------
# The sglang-jax adapter: every use of sglang-jax beyond its public Engine API
# ----------------------------------------------------------------------------------------------
# The rest of the tool reaches sglang-jax only through this section. Where the supported stacks differ, the
# difference is a line here with the stack named. probe_sglang() checks, before the engine starts, that the
# installed release has every module, attribute and signature used below (SGLANG_NEEDS).

SUPPORTED_STACKS = {  # name -> (sglang-jax distribution version, jax version); each one: make test-compat
    "bd09a87": ("0.0.2", "0.8.1"),  # the TPU reference run's commit (Jan 2026, calls itself 0.0.2); imports qwix
    "0.0.3rc99": ("0.0.3rc99", "0.8.1"),  # requirements-cpu.txt, requirements-tpu.txt
    "0.1.0rc0": ("0.1.0rc0", "0.10.2"),  # the newest release (Aug 2026)
    "0.1.0rc0-jax0.11": ("0.1.0rc0", "0.11.2"),  # with flax 0.12.12 (flax 0.12.4 cannot import on JAX 0.11)
}
ENGINE_ARGS = ("model_path", "load_format", "enable_single_process", "device", "tp_size", "dp_size", "dtype",
               "download_dir", "mem_fraction_static", "max_prefill_tokens", "max_total_tokens",
               "max_running_requests", "disable_precompile", "watchdog_timeout", "random_seed", "moe_backend",
               "log_level", "nnodes", "node_rank", "dist_init_addr")  # the ServerArgs engine_kwargs() passes
SGL = "sgl_jax.srt."
NEEDED = {  # module (under sgl_jax.srt. unless it starts with sgl_jax.) -> "attribute need" for each thing used.
    # need: "fields:a,b" dataclass fields; "call:a,b" a callable taking these parameters; "sets:a,b" the module's
    # code sets these attributes (on the objects a running engine makes); "reads:a" its code names it. The
    # registry's sglang-jax 0.0.2 (older than bd09a87) fails several.
    "server_args": ["ServerArgs fields:" + ",".join(ENGINE_ARGS)],
    "entrypoints.engine": ["Engine sets:scheduler_info,tokenizer_manager,loop,server_args",
                           "run_scheduler_loop_thread_after_create call:server_args,port_args"],
    "managers.scheduler": [
        "Scheduler sets:_request_dispatcher,waiting_queue,running_batch,last_batch,cur_batch,tp_worker,server_args",
        "Scheduler.flush_cache call:", "Scheduler.stream_output call:reqs", "Scheduler._add_request_to_queue call:req",
        "Scheduler.pause_generation call:recv_req"],
    "sgl_jax.utils": ["TypeBasedDispatcher sets:_mapping"],
    "managers.schedule_batch": [
        "ScheduleBatch.retract_all call:server_args", "ScheduleBatch.filter_batch call:", "ScheduleBatch.is_empty call:",
        "ScheduleBatch.batch_size call:", "ScheduleBatch sets:forward_mode", "Req.finished call:",
        "Req sets:rid,origin_input_ids,output_ids,output_token_logprobs_val,req_pool_idx"],
    "model_executor.forward_batch_info": ["ForwardMode.is_extend call:"],
    "managers.io_struct": ["PauseGenerationReqInput call:mode", "ContinueGenerationReqInput call:"],
    "managers.tokenizer_manager": ["TokenizerManager.pause_generation call:",
                                   "TokenizerManager.continue_generation call:", "TokenizerManager.flush_cache call:",
                                   "TokenizerManager sets:tokenizer"],
    "managers.tp_worker_overlap_thread": ["ModelWorkerClient sets:worker"],
    "managers.tp_worker": ["ModelWorker sets:model_runner"],
    "model_executor.model_runner": ["ModelRunner sets:model_state_leaves,jitted_run_model,model,mesh,model_config"],
    "configs.model_config": ["ModelConfig.get_total_num_kv_heads call:", "ModelConfig sets:hf_config,dtype,model_path"],
    "configs.load_config": ["LoadConfig call:load_format"],
    "model_loader.loader": ["JAXModelLoader call:load_config,mesh", "JAXModelLoader.load_model call:model_config"],
    "utils.weight_utils": ["WeightLoader call:model,model_config,mesh,dtype", "WeightLoader reads:_dummy_mode",
                           "WeightLoader._get_param call:params,path",
                           "WeightLoader._load_dummy_weights call:params,weight_mappings"],
    "utils.common_utils": ["kill_process_tree call:parent_pid,include_parent"],
}
SGLANG_NEEDS = [(module if module.startswith("sgl_jax.") else SGL + module, *need.split(" ", 1))
                for module, needs in NEEDED.items() for need in needs]  # (module, attribute, need) rows

def installed_versions() -> dict[str, str | None]:
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {dist: version(dist) for dist in ("sglang-jax", "jax", "jaxlib", "flax")}


def missing_need(module: str, name: str, need: str, why: str = "") -> list[str]:
    """What of one SGLANG_NEEDS (or a Family's needs) row the installed sglang-jax lacks (empty: it has it)."""
    import importlib
    import inspect

    try:
        obj = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - whatever stops sglang-jax from importing is what the probe reports
        return [f"{module} does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"]
    source_module = obj
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return [f"{module}.{name}"]
    kind, _, names = need.partition(":")
    wanted = [n for n in names.split(",") if n]
    if kind == "fields":
        have = {f.name for f in dataclasses.fields(obj)}
        return [f"{name}.{n}" for n in wanted if n not in have]
    if kind == "call":
        try:
            params = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            params = {}
        return [f"{module}.{name}({n}=...)" for n in wanted if n not in params]
    if kind == "lacks":
        return [f"{name} still has `{names}`" + (f" ({why})" if why else "")] if names in inspect.getsource(obj) else []
    source = inspect.getsource(inspect.getmodule(obj) or source_module)
    if kind == "reads":
        return [f"{name} never reads {n}" for n in wanted if n not in source]
    # "sets": an assignment self.n = / self.n, x = / a dataclass field n:
    return [f"{name}.{n} (never set in {module})" for n in wanted
            if not re.search(rf"self\.{re.escape(n)}\b[^=\n]*=(?!=)", source)
            and not re.search(rf"^\s+{re.escape(n)}\s*:", source, re.M)]


@functools.cache
def probe_sglang(family: tuple[str, str] | None = None) -> dict:
    """Before the engine starts: every module, attribute and signature the adapter uses (SGLANG_NEEDS, and for
    `family`, (architecture, MoE backend), that Family's needs) is in the installed sglang-jax. Returns the
    versions and the matching SUPPORTED_STACKS name (None: untested, but it has everything); anything missing
    is exit 2, naming it, the versions and the supported stacks."""
    versions = installed_versions()
    missing = [m for row in SGLANG_NEEDS for m in missing_need(*row)]
    needs = FAMILIES[family[0]].needs.get(family[1], []) if family and family[0] in FAMILIES else []
    for_family = [] if missing else [m for row in needs for m in missing_need(*row)]
    if missing or for_family:
        imports = list(dict.fromkeys(m for m in missing if "does not import" in m))
        found = missing or for_family
        shown = imports[:1] if imports else found[:6]
        installed = f"the installed sglang-jax {versions['sglang-jax']} (jax {versions['jax']})"
        what = (f"{installed} lacks what the swap needs: " if missing else
                f"{installed} cannot run the swap for {family[0]} ({family[1]}): ") + "; ".join(shown)
        stacks = "; ".join(f"{name}: sglang-jax {v}, jax {j}" for name, (v, j) in SUPPORTED_STACKS.items()
                           if missing or (v, j) != (versions["sglang-jax"], versions["jax"]))
        raise ToolError("sglang_jax", what + (f" (and {len(found) - len(shown)} more)" if len(found) > len(shown) else ""),
                        ("bd09a87 imports qwix (pip install qwix==0.1.8); else " if any("'qwix'" in m for m in imports) else "")
                        + ("install a supported stack" if missing else "the other families run on this stack; for "
                         "this one install another supported stack") + " (docs/tpu.md: one requirements file each): "
                        + stacks, EXIT_BAD_INPUT, versions=versions, missing=found,
                        supported_stacks=list(SUPPORTED_STACKS))
    stack = next((name for name, (v, j) in SUPPORTED_STACKS.items()
                  if (v, j) == (versions["sglang-jax"], versions["jax"])), None)
    if stack is None and family is None:
        log(f"sglang-jax {versions['sglang-jax']} with jax {versions['jax']} is not a tested stack (it has everything "
            f"the swap uses; tested: {', '.join(SUPPORTED_STACKS)})")
    return {**versions, "stack": stack}


class EngineErrorLog(logging.Handler):
    """The last error sglang-jax logged: its scheduler logs the exception (a traceback) and then SIGQUITs, so
    this is the engine's own message for the error line."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.last: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.last = record.getMessage()

    def text(self) -> str | None:
        lines = [line.strip() for line in (self.last or "").splitlines() if line.strip()]
        return lines[-1] if lines else None


ENGINE_ERRORS = EngineErrorLog()


def engine_scheduler(engine):
    """The in-process scheduler (enable_single_process=True), or None."""
    return (engine.scheduler_info or {}).get("scheduler")


def engine_model_runner(engine):
    return engine_scheduler(engine).tp_worker.worker.model_runner


def engine_extras(engine) -> dict:
    """Where the tool keeps its hooks on one engine (several ParamSwappers of one engine share them)."""
    return engine.scheduler_info


def engine_loop(engine):
    """The event loop the engine's own sync calls run (run_until_complete) and its coroutines belong to."""
    return engine.loop


def engine_tokenizer(engine):
    return engine.tokenizer_manager.tokenizer


def radix_cache_tokens(scheduler) -> int | None:
    """Tokens the scheduler's radix (prefix) cache holds; None where it has none (radix cache disabled)."""
    size = getattr(getattr(scheduler, "tree_cache", None), "total_size", None)
    return int(size()) if callable(size) else None


def engine_loaded_dummy(engine) -> bool:
    return str(getattr(getattr(engine, "server_args", None), "load_format", None)) in ("dummy", "LoadFormat.DUMMY")


def leaves_of(model_runner) -> list:
    """The flattened nnx state every forward reads: ModelRunner.initialize_jit flattens it once, and each forward
    passes `model_state_leaves` to a jitted function whose treedef is frozen."""
    return model_runner.model_state_leaves


def rebind_leaves(model_runner, leaves: list) -> None:
    """A NEW list, never the old one changed in place (releases after 0.0.3rc99 cache on its identity)."""
    model_runner.model_state_leaves = leaves


def runner_model(model_runner):
    return model_runner.model


def runner_facts(model_runner) -> dict:
    """What the plan needs of the engine's model config: its KV heads before tp replication, its HF
    architecture, its MoE backend (epmoe or fused)."""
    config = model_runner.model_config
    return {"num_kv_heads": config.get_total_num_kv_heads(),
            "arch": (getattr(config.hf_config, "architectures", None) or [None])[0],
            "moe_backend": getattr(config.hf_config, "moe_backend", None)}


def kill_engine_children() -> None:
    """sglang-jax's own process-tree kill, for this process's children (the engine's)."""
    from sgl_jax.srt.utils.common_utils import kill_process_tree

    kill_process_tree(os.getpid(), include_parent=False)


class RequestRecorder:
    """The scheduler's own record of every finished request: prompt ids, generated ids and their logprobs.

    sglang-jax 0.0.3rc99's answer to a non-streaming `generate` is not the generated sequence once it spans
    the scheduler's forced 50-token chunk: the detokenizer re-sends ids it already sent whenever its
    incremental text ends in an incomplete UTF-8 character (64 tokens came back as 114 ids), it drops
    special tokens such as a generated EOS, and `meta_info.output_token_logprobs` holds 50 + N entries for N
    tokens. The scheduler's `Req` (`origin_input_ids`, `output_ids`, `output_token_logprobs_val`) is right.
    In single-process mode the scheduler runs in this process: wrap its `stream_output` (the one place every
    finished request passes) and copy those lists before they are sent. Records nobody takes (requests sent
    to the engine by others) are dropped oldest first past `keep`."""

    def __init__(self, scheduler, keep: int = 1024):
        self.finished: dict[str, dict] = {}
        original = scheduler.stream_output

        def stream_output(reqs, *args, **kwargs):
            for req in reqs:
                if req.finished() and req.rid not in self.finished:
                    self.finished[req.rid] = {
                        "prompt_ids": [int(t) for t in req.origin_input_ids],
                        "output_ids": [int(t) for t in req.output_ids],
                        "output_logprobs": ([float(v) for v in req.output_token_logprobs_val]
                                            if req.output_token_logprobs_val is not None else None)}
                    while len(self.finished) > keep:
                        self.finished.pop(next(iter(self.finished)))
            return original(reqs, *args, **kwargs)

        scheduler.stream_output = stream_output

    def take(self, rid: str) -> dict:
        if rid not in self.finished:
            raise ToolError("generate", f"the scheduler kept no record of request {rid}",
                            "sglang-jax's scheduler no longer passes finished requests through stream_output: "
                            "this tool needs a supported sglang-jax (SUPPORTED_STACKS)", EXIT_ENGINE)
        return self.finished.pop(rid)


def request_recorder(engine) -> RequestRecorder:
    """The engine's RequestRecorder (start_engine and ParamSwapper make it before any request of theirs)."""
    extras = engine_extras(engine)
    if "request_recorder" not in extras:
        extras["request_recorder"] = RequestRecorder(engine_scheduler(engine))
    return extras["request_recorder"]


def start_engine(kwargs: dict):
    """An in-process sglang-jax Engine and its model runner. A failure inside Engine(...) (its scheduler's
    start: a KV cache that does not fit, an engine argument it rejects, a model that cannot be built) is a
    ToolError with the engine's own message, exit 3. When it arrives as SIGQUIT, the Stopper answers."""
    probe_sglang()
    import jax
    import sgl_jax.srt.entrypoints.engine as engine_module
    from sgl_jax.srt.entrypoints.engine import Engine

    if kwargs.get("nnodes", 1) > 1:
        os.environ["SGLANG_BLOCK_NONZERO_RANK_CHILDREN"] = "0"  # rank >= 1: Engine() returns, no health server
    if ENGINE_ERRORS not in logging.getLogger().handlers:
        logging.getLogger().addHandler(ENGINE_ERRORS)
    made = []  # the scheduler, also on rank >= 1 of several hosts, where Engine() keeps no handle on it
    create = engine_module.run_scheduler_loop_thread_after_create

    def create_and_keep(*args, **kwargs):
        made.append(create(*args, **kwargs))
        return made[-1]

    initialize = jax.distributed.initialize
    if kwargs.get("nnodes", 1) > 1 and jax.distributed.is_initialized():
        # bd09a87's Scheduler.__init__ calls jax.distributed.initialize whenever nnodes > 1 (0.0.3rc99 and later
        # skip it when JAX is initialized already: HOSTS.start did, before JAX's backend started)
        jax.distributed.initialize = lambda *args, **kwargs: None
    engine_module.run_scheduler_loop_thread_after_create = create_and_keep
    try:
        engine = Engine(**kwargs)
    except Exception as e:  # noqa: BLE001 - the engine's own errors become one clear error line
        raise ToolError("engine_start", ENGINE_ERRORS.text() or f"{type(e).__name__}: {e}",
                        "see the engine's traceback on stderr", EXIT_ENGINE) from e
    finally:
        engine_module.run_scheduler_loop_thread_after_create = create
        jax.distributed.initialize = initialize
    if engine.scheduler_info is None and made and made[-1]:  # rank >= 1: no tokenizer, only its scheduler
        engine.scheduler_info = dict(made[-1])
    if engine_scheduler(engine) is None:
        raise ToolError("engine_start", ENGINE_ERRORS.text() or "the engine started without an in-process scheduler",
                        "see the engine's traceback on stderr", EXIT_ENGINE)
    request_recorder(engine)  # before any request: generate_greedy() reads the scheduler's own ids from it
    return engine, engine_model_runner(engine)


PAUSE_MODE = "retract"  # see ServeGuard and docs/phases.md ("Swapping while the engine serves")
BATCH_INPUTS_KEPT = 4  # forward steps whose inputs serving_bytes() looks at (the paused scheduler holds the last)


class ServeGuard:
    """Hooks on the in-process scheduler that make a swap atomic with respect to generation, and prove it.

    The swap runs between `pause_generation("retract")` and `continue_generation()`. Retract (not in_place,
    not abort): every running request goes back to the waiting queue with its KV freed (not cached) and keeps
    its tokens so far; after the swap it is prefilled again (prompt + those tokens) with the NEW weights and
    generates the rest with them. in_place would keep KV computed with the old weights under the new ones,
    and abort loses the requests. sglang-jax's `flush_cache()` refuses while any request waits, so retracted
    requests would keep the radix cache (prefix KV of the old weights) alive: `flush_cache` here holds the
    waiting requests aside while the scheduler's own flush runs, on the scheduler's thread, only when every
    held request owns no KV (a retracted or never-started request), and its answer is checked by the swap.

    sglang-jax's retract (bd09a87 to 0.1.0rc0) also misses the requests of a prefill batch that ran last and was
    not yet merged into the running batch (the overlap scheduler merges it at its next step; the pause drops
    that step): they would never finish (overlap) or keep their old-weight KV (no overlap). `pause_generation`
    here retracts them too, as upstream SGLang merges them before retracting.

    Every forward step records the weight set it ran on (`weights_id`, set by each completed swap) and whether
    a swap was changing the Params (`changing`) when it started or ended: a step that saw a change is `mixed`;
    and its input arrays (weakly): what the batch of a paused scheduler still holds (serving_bytes). The
    engine's failure signals (a forward-thread exception, the watchdog) go to this process, where the
    Stopper turns them into one error line and exit 3; sglang-jax sends them to the parent process."""

    def __init__(self, engine):
        import jax
        import psutil

        self.engine = engine
        scheduler, model_runner = engine_scheduler(engine), engine_model_runner(engine)
        self.weights_id = 0  # 0: the dummy weights; each completed swap sets a new id (a rolled-back one not)
        self.changing = False  # True while a swap changes Params (and after a failed swap that could not restore)
        self.forwards = 0
        self.by_weights: dict[int, int] = {}  # weights_id -> forward steps that ran on exactly that set
        self.mixed: list[dict] = []  # forward steps that saw a change of weights
        self.hold_waiting = False  # set by flush(): hold waiting requests aside while the scheduler flushes
        self.held = 0
        self.flushes = 0  # flushes the scheduler has handled (its own thread; rank >= 1: rank 0's, forwarded)
        self.flushes_at_pause = 0  # flushes when the last pause was confirmed (the swap's flush is the next)
        self.last_flush: dict = {}  # the last one's success, message, requests held aside, radix tokens after it
        self.batch_inputs: list[list] = []  # weakrefs to the input arrays of the last BATCH_INPUTS_KEPT forwards
        self.before_serving = {id(a): weakref.ref(a) for a in jax.live_arrays()}  # never counted as a batch's
        run_model = model_runner.jitted_run_model

        def jitted_run_model(*args, **kwargs):
            start = (self.weights_id, self.changing)
            out = run_model(*args, **kwargs)
            end = (self.weights_id, self.changing)
            self.forwards += 1
            if start[1] or end[1] or start[0] != end[0]:
                if len(self.mixed) < 100:
                    self.mixed.append({"forward": self.forwards, "weights_at_start": start[0],
                                       "weights_at_end": end[0], "swap_running": start[1] or end[1]})
            else:
                self.by_weights[start[0]] = self.by_weights.get(start[0], 0) + 1
            # the batch's arrays (ForwardBatch, LogitsMetadata: pytrees); the weights and the KV cache are not
            # arguments of this wrapper (it reads model_state_leaves and memory_pools itself)
            self.batch_inputs.append([weakref.ref(a) for a in jax.tree_util.tree_leaves((args, kwargs))
                                      if isinstance(a, jax.Array)])
            del self.batch_inputs[:-BATCH_INPUTS_KEPT]
            return out

        model_runner.jitted_run_model = jitted_run_model
        flush = scheduler.flush_cache

        def held_aside():
            self.held = 0
            if not self.hold_waiting:
                return flush()
            held = scheduler.waiting_queue
            owning = [r.rid for r in held if r.req_pool_idx is not None]
            if owning:
                return False, f"{len(owning)} waiting request(s) own KV cache", 0
            scheduler.waiting_queue = []
            try:
                return flush()
            finally:
                scheduler.waiting_queue = held + scheduler.waiting_queue
                self.held = len(held)

        def flush_cache():
            out = held_aside()
            self.last_flush = {"success": bool(out[0]), "message": str(out[1] or ""),
                               "held": self.held,
                               "radix_tokens_after": radix_cache_tokens(scheduler)}
            self.flushes += 1
            return out

        scheduler.flush_cache = flush_cache
        mapping = scheduler._request_dispatcher._mapping
        index = next(i for i, (ty, _) in enumerate(mapping) if ty.__name__ == "PauseGenerationReqInput")
        pause = mapping[index][1]

        def pause_generation(recv_req):
            last = scheduler.last_batch
            out = pause(recv_req)
            self.retracted_prefills = 0
            self.paused_requests = None
            if recv_req.mode == "retract" and last is not None and last is not scheduler.running_batch \
                    and last.forward_mode.is_extend():
                last.filter_batch()  # finished requests are already released
                if not last.is_empty():
                    for req in last.retract_all(scheduler.server_args):
                        scheduler._add_request_to_queue(req)
                        self.retracted_prefills += 1
                scheduler.last_batch = scheduler.cur_batch = None
            running = 0 if scheduler.running_batch.is_empty() else scheduler.running_batch.batch_size()
            self.paused_requests = len(scheduler.waiting_queue) if running == 0 else None  # None: not paused
            self.pauses += 1
            return out

        mapping[index] = (mapping[index][0], pause_generation)
        self.retracted_prefills = 0
        self.pauses = 0  # pause requests the scheduler has handled (its own thread)
        self.paused_requests: int | None = None  # requests it held at the last pause (None: still running some)
        for owner in (scheduler, scheduler.tp_worker):
            if hasattr(owner, "parent_process"):
                owner.parent_process = psutil.Process()

    async def send_pause(self) -> None:
        """pause_generation(retract) through the tokenizer manager (the scheduler handles it on its thread)."""
        from sgl_jax.srt.managers.io_struct import PauseGenerationReqInput

        await self.engine.tokenizer_manager.pause_generation(PauseGenerationReqInput(mode=PAUSE_MODE))

    async def send_flush(self) -> None:
        """The scheduler's flush_cache with the waiting (retracted) requests held aside (last_flush says how it
        went, on every rank)."""
        self.hold_waiting = True
        try:
            await self.engine.tokenizer_manager.flush_cache()
        finally:
            self.hold_waiting = False

    async def send_continue(self) -> None:
        from sgl_jax.srt.managers.io_struct import ContinueGenerationReqInput

        await self.engine.tokenizer_manager.continue_generation(ContinueGenerationReqInput())

    def serving_bytes(self, exclude: set[tuple[int, int]]) -> int:
        """Device bytes of the arrays the batch of a paused (or idle) scheduler still holds: the live inputs of
        its last forward steps, e.g. the ForwardBatch's token and cache-location arrays (1.05 MB of the tiny
        test model's 28 MB, sized by --max-running-requests x the context, not by the model). Not weights: the
        memory checks count them apart. Buffers in `exclude` (the engine's weights, a trainer's arrays) and
        arrays that were alive before the guard was installed are never counted."""
        seen, total = set(exclude), 0
        for refs in self.batch_inputs:
            for ref in refs:
                arr = ref()
                if arr is None or arr.is_deleted():
                    continue
                old = self.before_serving.get(id(arr))
                if old is not None and old() is arr:
                    continue
                try:
                    buffers = device_buffers(arr, wait=False)
                except (RuntimeError, TypeError):  # deleted since (a forward donated it): not held any more
                    continue
                for device, ptr, nbytes in buffers:
                    if (device.id, ptr) not in seen:
                        seen.add((device.id, ptr))
                        total += nbytes
        return total

    def forward_counts(self) -> dict:
        return {"forwards": self.forwards, "forwards_mixed": len(self.mixed),
                "forwards_by_weights": {str(k): v for k, v in sorted(self.by_weights.items())}}


def serve_guard(engine) -> ServeGuard:
    """The engine's ServeGuard (installed at its first use)."""
    extras = engine_extras(engine)
    if "serve_guard" not in extras:
        extras["serve_guard"] = ServeGuard(engine)
    return extras["serve_guard"]


class LoaderTap:
    """Stands in for one Param of the model that sglang-jax's own loader fills. The loader reads the Param's
    shape and dtype through `.value` (an abstract value: the model is built with nnx.eval_shape) and its
    assignment `.value = array` goes to `on_assign` and is dropped: only one loaded tensor exists at a time."""

    def __init__(self, path: str, abstract, on_assign):
        self._path, self._abstract, self._on_assign = path, abstract, on_assign

    @property
    def value(self):
        return self._abstract

    @value.setter
    def value(self, array) -> None:
        self._on_assign(self._path, array)


def run_own_loader(model_runner, model_path: str, on_assign) -> None:
    """sglang-jax's OWN loader (its model file's weight mappings, its WeightLoader) over the checkpoint at
    `model_path`, on the engine's mesh and config, with every Param assignment handed to on_assign(path, array)
    instead (LoaderTap). on_assign must never raise: the loader's "fast load" path (every supported stack) takes
    any exception inside it as its own failure, logs a warning and assigns the same Param again on its slow
    path. 0.1.0rc0's loader reads through thread pools; its assignments come from the calling thread, but
    on_assign is written for any thread."""
    import copy

    from sgl_jax.srt.configs.load_config import LoadConfig
    from sgl_jax.srt.model_loader.loader import JAXModelLoader
    from sgl_jax.srt.utils.weight_utils import WeightLoader

    original = WeightLoader._get_param
    WeightLoader._get_param = lambda self, params, path: LoaderTap(path, original(self, params, path).value, on_assign)
    try:
        model_config = copy.copy(model_runner.model_config)
        model_config.model_path = model_path
        model_config._dummy_mode = False  # the engine's config says "dummy" (DummyModelLoader sets it; WeightLoader reads it)
        JAXModelLoader(LoadConfig(load_format="auto"), model_runner.mesh).load_model(model_config=model_config)
    finally:
        WeightLoader._get_param = original


def path_str(path) -> str:
    """('model', 'layers', 0, 'mlp', ...) or a jax key path -> 'model.layers.0.mlp...' (without '.value')."""
    parts = []
    for k in path:
        k = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        parts.append(str(k))
    if parts and parts[-1] == "value":
        parts.pop()
    return ".".join(parts)


def model_params(model) -> dict[str, Any]:
    """{nnx path: nnx.Param} of an nnx model."""
    from flax import nnx

    return {path_str(p): node for p, node in nnx.iter_graph(model) if isinstance(node, nnx.Param)}


def engine_params(model_runner) -> dict[str, Any]:
    """{nnx path: nnx.Param} of the engine's model."""
    return model_params(runner_model(model_runner))


def dummy_weights(model_runner, paths: set[str]) -> dict[str, Any]:
    """{nnx path: array} of these Params as sglang-jax's load_format="dummy" makes them: its own loader's dummy
    initialiser, run for these Params only, into an abstract copy of the model (the engine is not touched).
    Its values: uniform(-1e-3, 1e-3) up to 0.0.3rc99, zeros in 0.1.0rc0; either way re-created bit for bit."""
    import jax
    from flax import nnx
    from sgl_jax.srt.utils.weight_utils import WeightLoader

    model, config = model_runner.model, model_runner.model_config
    make = [getattr(model, n) for n in dir(type(model)) if n.startswith("_create_") and n.endswith("weight_mappings")]
    if len(make) != 1:
        raise RuntimeError(f"{type(model).__name__} has {len(make)} _create_*weight_mappings methods, not 1")
    mesh = model_runner.mesh
    with jax.set_mesh(mesh):
        abstract = nnx.eval_shape(lambda: type(model)(config.hf_config, dtype=config.dtype, mesh=mesh))
    wanted = {k: m for k, m in make[0]().items()
              if (t := getattr(m, "target_path", m)) and (t if isinstance(t, str) else t[0]) in paths}
    WeightLoader(model=abstract, model_config=config, mesh=mesh, dtype=config.dtype)._load_dummy_weights(
        nnx.state(abstract), wanted)
    made = {p: v.get_value() for p, v in model_params(abstract).items() if p in paths}
    missing = paths - {p for p, a in made.items() if on_devices(a)}
    if missing:
        raise RuntimeError(f"sglang-jax's dummy initialiser made no array for {sorted(missing)[:3]}")
    return made


# ----------------------------------------------------------------------------------------------
# The engine's state: its Params, its flattened leaves, and the one way to change them (EngineState.assign)
# ----------------------------------------------------------------------------------------------


def engine_kwargs(cfg: RunConfig, model_path: str, device: str, load_format: str) -> dict:
    """sglang-jax ServerArgs for this run (shared with the tests' reference engine)."""
    return dict(
        model_path=model_path, load_format=load_format, enable_single_process=True, device=device,
        tp_size=cfg.tp_size, dp_size=cfg.dp_size, dtype=cfg.dtype, download_dir=cfg.download_dir,
        mem_fraction_static=cfg.mem_fraction_static, max_prefill_tokens=cfg.max_prefill_tokens,
        max_total_tokens=cfg.max_total_tokens, max_running_requests=cfg.max_running_requests,
        disable_precompile=not cfg.precompile, watchdog_timeout=cfg.watchdog_timeout,
        random_seed=cfg.random_seed, moe_backend=cfg.moe_backend, log_level="warning",
        **({"nnodes": cfg.nnodes, "node_rank": cfg.node_rank, "dist_init_addr": cfg.dist_init_addr}
           if cfg.nnodes > 1 else {}),
    )


def engine_leaf_paths(model_runner):
    """Paths of the flattened nnx state, in model_state_leaves order, and its treedef."""
    import jax
    from flax import nnx

    with_path, treedef = jax.tree_util.tree_flatten_with_path(nnx.split(runner_model(model_runner))[1])
    return [path_str(p) for p, _ in with_path], treedef


def param_bytes_sum(arrays) -> int:
    """Bytes of the arrays' addressable shards, summed over devices (replicated data counted per device)."""
    return sum(nbytes for a in arrays for _, _, nbytes in device_buffers(a, wait=False))


class EngineState:
    """The engine's Params and its flattened leaves, with the one way to change them."""

    def __init__(self, model_runner):
        self.model_runner = model_runner
        self.params = engine_params(model_runner)
        self.leaf_paths, self.treedef = engine_leaf_paths(model_runner)
        self.leaf_index = {p: i for i, p in enumerate(self.leaf_paths)}

    def leaves(self) -> list:
        return leaves_of(self.model_runner)

    def assign(self, path: str, new) -> Any:
        """Point the Param at `new` and rebind model_state_leaves to a NEW list holding it (never mutate the
        engine's list in place), so the forward always sees live buffers. Returns the array it replaced."""
        old = self.params[path].get_value()
        self.params[path].set_value(new)
        leaves = list(self.leaves())
        leaves[self.leaf_index[path]] = new
        rebind_leaves(self.model_runner, leaves)
        return old

    def rebind_from_model(self) -> None:
        """model_state_leaves = a new flattening of the model; the structure must not change."""
        import jax
        from flax import nnx

        leaves, treedef = jax.tree_util.tree_flatten(nnx.split(runner_model(self.model_runner))[1])
        if treedef != self.treedef:
            raise ToolError("swap", "the model's state structure changed during the swap",
                            "a swapped Param changed the nnx tree; this would recompile or fail", EXIT_ENGINE)
        rebind_leaves(self.model_runner, leaves)


# ----------------------------------------------------------------------------------------------
# Generation: greedy, always max_new_tokens tokens, the ids as the scheduler generated them
# ----------------------------------------------------------------------------------------------


def check_live(engine) -> None:
    """Every weight the forward reads is a live buffer. An engine Param aliased to a trainer array (--alias)
    dies when the trainer donates that buffer to its next step (jit donate_argnums); generating then would
    crash the scheduler (exit 137) or worse. One clear error instead, before the request is sent. An engine
    without an in-process scheduler (not enable_single_process) has no Params this tool could have swapped."""
    if engine_scheduler(engine) is None:
        return
    leaves = leaves_of(engine_model_runner(engine))
    deleted = sum(on_devices(leaf) and leaf.is_deleted() for leaf in leaves)
    if deleted:
        raise ToolError("engine_weights_deleted", f"{deleted} of the engine's {len(leaves)} weight buffers were "
                        "deleted before generation", "a trainer step donated arrays the engine aliases (alias=True "
                        "/ --alias): swap again after the step, swap without alias, or do not donate them",
                        EXIT_ENGINE)


def greedy(max_new_tokens: int) -> dict:
    return {"temperature": 0.0, "max_new_tokens": max_new_tokens, "ignore_eos": True}


def answer_of(engine, out: dict, max_new_tokens: int, logprobs: bool) -> dict:
    """The engine's answer, with the scheduler's own ids and the consistency cross-checks (see generate_greedy())."""
    meta = {k: v for k, v in out.get("meta_info", {}).items() if not k.endswith("logprobs")}
    record = request_recorder(engine).take(meta["id"])
    ids = record["output_ids"]
    decoded = engine_tokenizer(engine).decode(ids, skip_special_tokens=True)
    problems = []
    if not len(ids) == meta.get("completion_tokens") == max_new_tokens:
        problems.append(f"{len(ids)} ids, completion_tokens {meta.get('completion_tokens')}, "
                        f"max_new_tokens {max_new_tokens}")
    if logprobs and len(record["output_logprobs"] or []) != len(ids):
        problems.append(f"{len(record['output_logprobs'] or [])} logprobs for {len(ids)} ids")
    if out["text"] != decoded:
        problems.append("the engine's text is not the decoding of the generated ids")
    result = {"text": out["text"], "output_ids": ids, "num_tokens": len(ids),
              "finish_reason": meta.get("finish_reason"), "prompt_ids": record["prompt_ids"],
              "api_output_ids_match": list(out.get("output_ids", [])) == ids,
              "consistent": not problems, "consistency_problems": problems, "meta_info": meta}
    if logprobs:
        result["output_logprobs"] = record["output_logprobs"]
    return result


def generate_greedy(engine, prompt: str, max_new_tokens: int, logprobs: bool = False) -> dict:
    """Greedy, `ignore_eos` (every answer has max_new_tokens tokens, so comparisons never depend on where
    an EOS falls), with the scheduler's own ids. `consistent` cross-checks the engine's answer: token count
    = completion_tokens = max_new_tokens, one logprob per token, and the engine's text = the decoding of the
    ids. The engine's API `output_ids` are reported beside (`api_output_ids_match`), not trusted."""
    if HOSTS.rank:  # rank 0 sends the request (its scheduler hands it on to this host's); its answer
        return HOSTS.from_rank0("generate")
    check_live(engine)
    return HOSTS.from_rank0("generate", answer_of(engine, engine.generate(
        prompt=prompt, return_logprob=logprobs, sampling_params=greedy(max_new_tokens)), max_new_tokens, logprobs))


def check_generate(phases: PhaseLog) -> bool:
    """Every answer so far was consistent (see generate_greedy()): a wrong count or a text that is not the ids'
    decoding means the engine's answer cannot be trusted, whatever the weights."""
    bad = {phase: out["consistency_problems"] for phase, out in phases.answers if not out["consistent"]}
    return phases.check("generate", bool(phases.answers) and not bad, answers_checked=len(phases.answers),
                      num_tokens=[out["num_tokens"] for _, out in phases.answers], inconsistent=bad)


def check_restored(error: ToolError, engine, cfg, previous_output: dict) -> None:
    """After a failed swap was rolled back (or refused before anything was assigned), the engine must answer
    exactly as it did with those weights."""
    if error.details.get("restored") or error.details.get("assigned") == 0:
        if HOSTS.rank == 0:  # reaches every host's scheduler
            engine.flush_cache()
        out = generate_greedy(engine, cfg.prompt, cfg.max_new_tokens)
        error.details["previous_weights_answer_matches"] = out["output_ids"] == previous_output["output_ids"]


def check_swap_effective(phases: PhaseLog, before: dict, after: dict) -> bool:
    """The same prompt and greedy sampling must answer differently once the real weights are in: a swap the
    forward never sees (no rebind, stale radix cache) keeps the dummy answer."""
    return phases.check("swap_effective", before["output_ids"] != after["output_ids"],
                      before_swap_output_ids=before["output_ids"], after_swap_output_ids=after["output_ids"])


# ----------------------------------------------------------------------------------------------
# Phase 3: HF checkpoint -> MLLM-JAX flax params tree, on the host
# ----------------------------------------------------------------------------------------------

# HF name -> MLLM-JAX flax key. Linear weights are [out, in] in HF and [in, out] ("kernel") in flax.
HF_TO_MLLM = [  # (HF regex, MLLM template, transpose)
    (r"model\.embed_tokens\.weight", "model.embed_tokens.embedding", False),
    (r"model\.norm\.weight", "model.norm.scale", False),
    (r"lm_head\.weight", "lm_head.kernel", True),
    (r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight", "model.layers_{0}.{1}.scale", False),
    (r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.weight", "model.layers_{0}.self_attn.{1}_proj.kernel", True),
    (r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.bias", "model.layers_{0}.self_attn.{1}_proj.bias", False),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", "model.layers_{0}.mlp.{1}_proj.kernel", True),
    (r"model\.layers\.(\d+)\.self_attn\.([qk])_norm\.weight", "model.layers_{0}.self_attn.{1}_norm.scale", False),
    (r"model\.layers\.(\d+)\.mlp\.gate\.weight", "model.layers_{0}.mlp.gate.kernel", True),  # MoE router
]
# MoE experts: HF keeps one tensor per expert; the MLLM tree stacks a layer's experts, [expert, in, out]
HF_EXPERT = r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight"
MLLM_EXPERTS = "model.layers_{0}.mlp.experts.{1}_proj.kernel"


def to_numpy(t) -> np.ndarray:
    """numpy array of a numpy or torch tensor, without copies and without an fp16 detour for bf16."""
    if isinstance(t, np.ndarray):
        return t
    import ml_dtypes
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def hf_to_mllm(tensors: Mapping[str, Any], tie_word_embeddings: bool, dtype: str = "bfloat16") -> dict[str, np.ndarray]:
    """{HF name: numpy|torch tensor} -> flat MLLM-JAX tree {'model.layers_0.self_attn.q_proj.kernel': ndarray}.

    Kernels are transposed views (no copy); arrays are cast to `dtype` only where they differ.
    A tied checkpoint's lm_head (absent from its files, or present as an alias of the embedding) is dropped:
    the embedding is the head.
    """
    want = host_dtype(dtype)
    flat: dict[str, np.ndarray] = {}
    experts: dict[str, dict[int, np.ndarray]] = {}
    for name, tensor in tensors.items():
        if any(re.fullmatch(rx, name) for rx in HF_IGNORED) or (tie_word_embeddings and name == "lm_head.weight"):
            continue
        m = re.fullmatch(HF_EXPERT, name)
        if m:
            experts.setdefault(MLLM_EXPERTS.format(m[1], m[3]), {})[int(m[2])] = to_numpy(tensor).T
            continue
        for rx, template, transpose in HF_TO_MLLM:
            m = re.fullmatch(rx, name)
            if m:
                arr = to_numpy(tensor)
                arr = arr if arr.dtype == want else arr.astype(want)
                flat[template.format(*m.groups())] = arr.T if transpose else arr
                break
        else:
            raise ToolError("checkpoint", f"unexpected tensor {name!r} in the checkpoint",
                            "this tool converts Qwen2, Qwen3, Qwen3-MoE and Llama checkpoints (embed, layers, "
                            "norm, lm_head)")
    for key, by_expert in experts.items():  # one host copy per layer and projection: the stacked experts
        if sorted(by_expert) != list(range(len(by_expert))):
            raise ToolError("checkpoint", f"{key}: experts {sorted(by_expert)} are not 0..{len(by_expert) - 1}",
                            "every expert of a layer must be in the checkpoint")
        stacked = np.stack([by_expert[e] for e in range(len(by_expert))])
        flat[key] = stacked if stacked.dtype == want else stacked.astype(want)
    return flat


def nest(flat: Mapping[str, Any]) -> dict:
    """Flat dotted keys -> the nested dict flax uses ({'model': {'layers_0': {...}}})."""
    from flax import traverse_util

    return traverse_util.unflatten_dict(dict(flat), sep=".")


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    from flax import traverse_util

    return traverse_util.flatten_dict(tree, sep=".")


def read_torch_state_dict(info: CheckpointInfo) -> dict[str, Any]:
    """The reference run's path: transformers' model, then its state_dict (torch tensors)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(info.path, torch_dtype="auto", low_cpu_mem_usage=True)
    return dict(model.state_dict())


def read_mllm_tree(cfg, info: CheckpointInfo) -> tuple[dict, float]:
    """The MLLM-JAX params tree of a checkpoint, and the seconds spent reading the files."""
    t = time.perf_counter()
    tensors = read_torch_state_dict(info) if cfg.weights_source == "torch" else read_safetensors(info)
    read_s = time.perf_counter() - t
    flat = hf_to_mllm(tensors, info.tie_word_embeddings, cfg.mllm_param_dtype)
    for arr in flat.values():  # nobody changes it in place: the swapper may keep it as a free rollback (read_only)
        arr.flags.writeable = False
    return nest(flat), read_s


def load_mllm_params(path: str, dtype: str = "bfloat16", source: str = "safetensors") -> dict:
    """API: the MLLM-JAX params tree (nested, numpy leaves) of a local HF checkpoint folder, validated."""
    info = read_checkpoint_info(path)
    validate_checkpoint(info)
    return read_mllm_tree(argparse.Namespace(weights_source=source, mllm_param_dtype=dtype), info)[0]


def mllm_params_cpu_ready(phases: PhaseLog, cfg, info: CheckpointInfo) -> dict:
    phases.begin("mllm_params_cpu_ready")
    t = time.perf_counter()
    tree, read_s = read_mllm_tree(cfg, info)
    flat = flatten(tree)
    seconds = time.perf_counter() - t
    phases.phase("mllm_params_cpu_ready", weights_source=cfg.weights_source, dtype=cfg.mllm_param_dtype,
               num_tensors=len(flat), host_bytes=sum(a.nbytes for a in flat.values()), read_s=round(read_s, 4),
               convert_s=round(seconds - read_s, 4), seconds=round(seconds, 4), sample_keys=sorted(flat)[:3])
    return tree


# ----------------------------------------------------------------------------------------------
# Phase 4: MLLM tree -> {sglang nnx path: sharded jax.Array}, validated as a whole first
# ----------------------------------------------------------------------------------------------

# MLLM key -> sglang-jax Qwen2 nnx path, and how the host array becomes the target:
#   copy: same layout; transpose: [hidden, vocab] kernel -> [vocab, hidden] embedding;
#   kv_heads: repeat each KV head contiguously ([h0, h0, h1, h1]) when tp > num KV heads, as sglang-jax does.
MLLM_TO_SGLANG = [  # (MLLM regex, sglang template, op)
    (r"model\.embed_tokens\.embedding", "model.embed_tokens.embedding", "copy"),
    (r"model\.norm\.scale", "model.norm.scale", "copy"),
    (r"lm_head\.kernel", "lm_head.embedding", "transpose"),
    (r"model\.layers_(\d+)\.(input_layernorm|post_attention_layernorm)\.scale", "model.layers.{0}.{1}.scale", "copy"),
    (r"model\.layers_(\d+)\.self_attn\.([qo])_proj\.(kernel|bias)", "model.layers.{0}.self_attn.{1}_proj.{2}", "copy"),
    (r"model\.layers_(\d+)\.self_attn\.([kv])_proj\.(kernel|bias)", "model.layers.{0}.self_attn.{1}_proj.{2}", "kv_heads"),
    (r"model\.layers_(\d+)\.mlp\.(gate|up|down)_proj\.kernel", "model.layers.{0}.mlp.{1}_proj.weight", "copy"),
    (r"model\.layers_(\d+)\.self_attn\.([qk])_norm\.scale", "model.layers.{0}.self_attn.{1}_norm.scale", "copy"),
    (r"model\.layers_(\d+)\.mlp\.gate\.kernel", "model.layers.{0}.moe_gate.kernel", "copy"),  # MoE router
]


@dataclasses.dataclass
class SwapItem:
    target: str  # sglang nnx path
    source: str  # MLLM key
    op: str  # copy | transpose | kv_heads
    replicas: int  # KV-head repeat factor (1 unless op == kv_heads and tp > KV heads)
    shape: tuple
    dtype: Any
    sharding: Any
    nbytes_sum: int  # device bytes of the target over all devices


def target_name(mllm_key: str, arch: str | None = None, moe_backend: str | None = None) -> tuple[str, str]:
    family = FAMILIES.get(arch)
    rows = (family.sglang_rows + family.moe_backend_rows.get(moe_backend, [])) if family else []
    for rx, template, op in rows + MLLM_TO_SGLANG:
        m = re.fullmatch(rx, mllm_key)
        if m:
            groups = [("weight" if g == "kernel" else g) for g in m.groups()]
            return template.format(*groups), op
    raise ToolError("plan", f"no sglang-jax target for MLLM key {mllm_key!r}",
                    "the tree has a tensor the mapping does not know (Qwen2, Qwen3, Llama, Qwen3-MoE)")


def source_shape_after(op: str, shape: tuple, replicas: int) -> tuple:
    if op == "transpose":
        return tuple(reversed(shape))
    if op == "kv_heads":
        return (*shape[:-1], shape[-1] * replicas)
    return tuple(shape)


def plan_swap(flat: Mapping[str, np.ndarray], params: Mapping[str, Any], num_kv_heads: int,
              arch: str | None = None, moe_backend: str | None = None) -> list[SwapItem]:
    """Check the WHOLE swap before anything touches the engine: every target covered once, every source
    used, every shape right. Target shape, dtype and sharding come from the engine's own Params; `arch`
    (the engine's HF architecture) and `moe_backend` (epmoe or fused) pick the Family's own rows."""
    plan, problems, seen = [], [], set()
    for key in sorted(flat):
        target, op = target_name(key, arch, moe_backend)
        seen.add(target)
        if target not in params:
            problems.append(f"{key} -> {target}: the engine has no such Param")
            continue
        value = params[target].get_value()
        src_shape = tuple(flat[key].shape)
        replicas = 1
        if op == "kv_heads" and src_shape[-1]:
            replicas = max(1, value.shape[-1] // src_shape[-1])
            if src_shape[-1] % num_kv_heads:
                problems.append(f"{key}: last axis {src_shape[-1]} is not a multiple of {num_kv_heads} KV heads")
                continue
        expected = source_shape_after(op, src_shape, replicas)
        if expected != tuple(value.shape):
            problems.append(f"{key} {src_shape} -> {target}: gives {expected}, the engine has {tuple(value.shape)}")
            continue
        plan.append(SwapItem(target, key, op, replicas, tuple(value.shape), value.dtype, value.sharding,
                             param_bytes_sum([value])))
    problems += [f"{t}: no source tensor in the checkpoint" for t in sorted(set(params) - seen)]
    if problems:
        raise ToolError("plan", f"{len(problems)} tensor(s) do not fit the engine: " + "; ".join(problems[:5]),
                        "the checkpoint does not match the engine's model (sizes, layers, tied embeddings)")
    return plan


def plan_fingerprint(plan: list[SwapItem]) -> str:
    """What a plan does (sources, targets, ops, shapes, dtypes, shardings), hashed: equal on every host."""
    rows = [(i.target, i.source, i.op, i.replicas, list(i.shape), str(i.dtype), str(i.sharding.spec)) for i in plan]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def transposed_on_device(item: SwapItem, src: np.ndarray, transpose: str) -> bool:
    """With --transpose device, a host kernel that is a transposed view goes in as stored and is transposed on
    the devices (host_array, place)."""
    arr = src.T if item.op == "transpose" else src
    return transpose == "device" and arr.ndim == 2 and not arr.flags.c_contiguous and arr.T.flags.c_contiguous


def host_array(item: SwapItem, src: np.ndarray, num_kv_heads: int, transpose: str = "device") -> tuple[np.ndarray, bool]:
    """(host array in the engine dtype, transposed). The MLLM kernel is a transposed view of the checkpoint's
    [out, in] tensor. transpose "host": the array is the target's layout, possibly that strided view (jax.device_put
    copies it strided: the fastest on CPU). "device": C-contiguous; transposed=True means it is the target's
    transpose and place() transposes it on the devices (numpy's strided transpose copy runs at a few % of
    memcpy speed; a TPU transposes at HBM speed)."""
    arr = src if src.dtype == item.dtype else src.astype(item.dtype)  # keeps the memory layout
    if item.op == "transpose":
        arr = arr.T
    transposed = transposed_on_device(item, src, transpose)
    if transposed:
        arr = arr.T
    if item.op == "kv_heads" and item.replicas > 1:  # repeat each head contiguously: [h0, h0, h1, h1]
        axis = 0 if transposed else arr.ndim - 1
        shape = arr.shape
        heads = arr.reshape(*shape[:axis], num_kv_heads, shape[axis] // num_kv_heads, *shape[axis + 1:])
        arr = np.repeat(heads, item.replicas, axis=axis).reshape(*shape[:axis], -1, *shape[axis + 1:])
    return (arr if transpose == "host" else np.ascontiguousarray(arr)), transposed


COMPILES: dict[int, int] = {}  # XLA backend compiles run so far, per thread id (count_compiles)


def on_compile_event(event: str, duration: float, **_: Any) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        ident = threading.get_ident()
        COMPILES[ident] = COMPILES.get(ident, 0) + 1


@functools.cache
def compile_listener() -> None:
    import jax

    jax.monitoring.register_event_duration_secs_listener(on_compile_event)


def count_compiles() -> int:
    """XLA backend compiles this thread has run so far (a jax.monitoring listener, installed on first use):
    a swap reports the compiles it ran (prepare_compiles, swap_compiles); the scheduler's own compiles run
    in its thread and are not counted."""
    compile_listener()
    return COMPILES.get(threading.get_ident(), 0)


@dataclasses.dataclass
class SwapStats:
    """What one swap cost: seconds per step, device bytes placed, the peak, and whether the arrays it
    replaced were released (nothing else may still hold them)."""

    mode: str
    source: str = "host"  # host (numpy) or device (trainer-resident jax.Arrays)
    transpose: str = "device"  # host sources: where kernels are transposed (--transpose)
    bucket_bytes: int | None = None  # streaming: device bytes placed before they are assigned (None: bulk)
    bucket_tensors: list[int] = dataclasses.field(default_factory=list)  # tensors per bucket, in swap order
    host_s: float = 0.0  # layout + dtype on the host
    put_s: float = 0.0  # jax.device_put into the target sharding (and device transforms), until ready
    assign_s: float = 0.0  # Param assignment + leaves rebind
    backup_s: float = 0.0  # rollback "copy": host copies of the replaced arrays
    meter_s: float = 0.0  # the device-memory samples (a walk over every live array on CPU): not in the swap's time
    prepare_s: float = 0.0  # before generation is paused: compiling what the swap runs (prepare_swap)
    prepare_compiles: int = 0  # XLA compiles in prepare_swap (0 for a layout swapped before)
    finite_check: str = "target"  # NaN/Inf check: target (each bucket as placed), source (the tree first), off
    finite_check_s: float = 0.0  # its seconds (source: before generation is paused)
    swap_compiles: int = 0  # XLA compiles while the engine was changed (0: everything was prepared)
    transposed_bytes_sum: int = 0  # kernels transposed on the devices
    copied_bytes_sum: int = 0  # device bytes of the arrays made for the engine (not taken as they are: alias)
    aliased_bytes_sum: int = 0  # device bytes of trainer arrays the engine took as they are (alias)
    device_put_reshards: int = 0  # device sources on another device order than the engine's mesh (place_device)
    peak_bytes_in_use_sum: int = 0
    rss_before_bytes: int = dataclasses.field(default_factory=process_rss_bytes)
    peak_rss_bytes: int = 0  # host memory, sampled with the device peak after every bucket
    replaced: list = dataclasses.field(default_factory=list)  # weakrefs to the replaced arrays
    shared: set = dataclasses.field(default_factory=set)  # ids of engine arrays an earlier swap took from a trainer
    aliased: set = dataclasses.field(default_factory=set)  # ids of the trainer arrays this swap took (alias)
    replaced_shared: int = 0  # replaced arrays that were the trainer's (alias): the trainer owns them

    def sample_peak(self) -> None:
        t = time.perf_counter()
        self.peak_bytes_in_use_sum = max(self.peak_bytes_in_use_sum, bytes_in_use_sum(device_memory(collect=False)))
        self.peak_rss_bytes = max(self.peak_rss_bytes, process_rss_bytes())
        self.meter_s += time.perf_counter() - t

    def release(self, old) -> None:
        if id(old) in self.shared:  # still the trainer's array: not ours to free
            self.replaced_shared += 1
        else:
            self.replaced.append(weakref.ref(old))

    def still_alive(self) -> int:
        return sum(r() is not None for r in self.replaced)

    def as_json(self) -> dict:
        def gbps(seconds):
            return round(self.copied_bytes_sum / seconds / 1e9, 3) if seconds else None

        place_s = self.host_s + self.put_s
        return {"swap_mode": self.mode, "source": self.source, "transpose": self.transpose,
                "bucket_bytes": self.bucket_bytes, "buckets": len(self.bucket_tensors),
                "bucket_tensors": self.bucket_tensors,
                "host_s": round(self.host_s, 4), "put_s": round(self.put_s, 4),
                "place_s": round(place_s, 4), "assign_s": round(self.assign_s, 4), "backup_s": round(self.backup_s, 4),
                "meter_s": round(self.meter_s, 4), "prepare_s": round(self.prepare_s, 4),
                "prepare_compiles": self.prepare_compiles, "swap_compiles": self.swap_compiles,
                "finite_check": self.finite_check, "finite_check_s": round(self.finite_check_s, 4),
                "copied_bytes_sum": self.copied_bytes_sum,
                "aliased_bytes_sum": self.aliased_bytes_sum, "device_put_reshards": self.device_put_reshards,
                "place_gb_per_s": gbps(place_s), "host_gb_per_s": gbps(self.host_s), "put_gb_per_s": gbps(self.put_s),
                "transposed_bytes_sum": self.transposed_bytes_sum,
                "swap_peak_bytes_in_use_sum": self.peak_bytes_in_use_sum,
                "rss_before_swap_bytes": self.rss_before_bytes, "swap_peak_rss_bytes": self.peak_rss_bytes,
                "replaced_arrays": len(self.replaced) + self.replaced_shared,
                "replaced_shared_with_trainer": self.replaced_shared, "replaced_still_alive": self.still_alive()}


@functools.cache
def device_transpose(sharding):
    """A jitted 2-D transpose whose output lands in `sharding` (the input comes in the mirrored sharding,
    so every device transposes its own shard: no communication)."""
    import jax

    return jax.jit(lambda x: x.T, out_shardings=sharding)


def mirrored(sharding, ndim: int):
    import jax

    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*reversed(spec)))


def can_alias(item: SwapItem, src) -> bool:
    """The trainer's array is already exactly the target (shape, dtype, sharding): the engine can use it as is."""
    return (item.op == "copy" or (item.op == "kv_heads" and item.replicas == 1)) and src.dtype == item.dtype \
        and tuple(src.shape) == item.shape and src.sharding.is_equivalent_to(item.sharding, len(item.shape))


def as_target(item: SwapItem, src):
    """An array that can alias (can_alias) as the engine's: the trainer's array itself where its sharding is
    the target's; where it is only equivalent (the same devices and layout on another mesh, e.g. an FSDP mesh's
    first axis over the engine's tensor axis), the same per-device buffers in the target's sharding (no copy:
    sglang-jax's forward needs its own mesh on every weight, explicit axes)."""
    import jax

    if src.sharding == item.sharding:
        return src
    shards = [src.addressable_data(i) for i in range(len(src.sharding.addressable_devices))]
    by_device = {next(iter(a.devices())): a for a in shards}
    return jax.make_array_from_single_device_arrays(
        item.shape, item.sharding, [by_device[d] for d in item.sharding.addressable_devices_indices_map(item.shape)])


def fitting(sharding, shape: tuple):
    """`sharding`'s spec on its mesh, replicated along every axis of `shape` the mesh axes do not divide."""
    import jax

    mesh, spec = sharding.mesh, tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))

    def size(axes) -> int:
        return int(np.prod([mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))]))

    return jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(*[a if a is not None and n % size(a) == 0 else None
                                           for a, n in zip(spec, shape, strict=True)]))


def source_sharding(item: SwapItem, shape: tuple):
    """Where a source tensor of `shape` sits on the engine's mesh so that the item's transform needs no
    communication: the target's sharding (mirrored for a transpose), replicated where it does not divide, and
    along the heads axis of a KV projection whose heads are repeated (the repeat reshapes that axis)."""
    import jax

    sharding = fitting(mirrored(item.sharding, len(shape)) if item.op == "transpose" else item.sharding, shape)
    if item.op == "kv_heads" and item.replicas > 1:
        spec = (tuple(sharding.spec) + (None,) * len(shape))[:len(shape) - 1]
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec, None))
    return sharding


@functools.cache
def device_transform(op: str, replicas: int, num_kv_heads: int, dtype, sharding, as_bits: bool = False):
    """One jitted function, source -> target on the devices: dtype cast, transpose, KV-head repeat
    ([h0, h0, h1, h1], as host_array does), output in the target sharding. as_bits: the collective that
    reshards the result moves a 16-bit float as uint16 (IN_PROCESS_COLLECTIVES; the barriers keep
    XLA from folding the bitcasts away), the same bits."""
    import jax
    import jax.numpy as jnp

    # the same devices and spec on a mesh of Auto axes: a sharding constraint may not name Explicit ones
    auto_axes = jax.sharding.NamedSharding(jax.sharding.Mesh(sharding.mesh.devices, sharding.mesh.axis_names),
                                           sharding.spec)

    def transform(a):
        a = a.astype(dtype)
        if op == "transpose":
            a = a.T
        if op == "kv_heads" and replicas > 1:
            lead, last = a.shape[:-1], a.shape[-1]
            heads = a.reshape(*lead, num_kv_heads, last // num_kv_heads)
            a = jnp.repeat(heads, replicas, axis=-2).reshape(*lead, last * replicas)
        if as_bits:
            bits = jax.lax.optimization_barrier(jax.lax.bitcast_convert_type(a, jnp.uint16))
            bits = jax.lax.with_sharding_constraint(bits, auto_axes)
            a = jax.lax.bitcast_convert_type(jax.lax.optimization_barrier(bits), dtype)
        return a

    return jax.jit(transform, out_shardings=sharding)


def same_devices(item: SwapItem, src_sharding) -> bool:
    """A source on the engine's devices in the mesh's order: it can enter the same jit as the target."""
    return src_sharding._device_assignment == item.sharding._device_assignment


def local_slices(op: str, shape: tuple, src_sharding, dst_sharding) -> bool:
    """Every device already holds what its output needs (no collective): a replicated source, or a copy whose
    target slice on each device lies within the source slice there (the same layout, or a finer split)."""
    if src_sharding.is_fully_replicated:
        return True
    if op != "copy":
        return False
    src, dst = src_sharding.devices_indices_map(shape), dst_sharding.devices_indices_map(shape)

    def within(inner: slice, outer: slice, n: int) -> bool:
        (a, b, _), (c, d, _) = inner.indices(n), outer.indices(n)
        return c <= a and b <= d

    return all(all(within(i, o, n) for i, o, n in zip(dst[dev], src[dev], shape, strict=True)) for dev in dst)


@dataclasses.dataclass(frozen=True)
class DeviceStep:
    fn: Any  # a jitted function (device_transform)
    in_sharding: Any  # the sharding its input comes in
    wait: bool  # an in-process collective (IN_PROCESS_COLLECTIVES): waited on before the next is dispatched


def device_steps(item: SwapItem, shape: tuple, dtype, sharding, num_kv_heads: int) -> list[DeviceStep]:
    """The jitted functions that take a device source of this shape, dtype and sharding (on the engine's
    devices in the mesh's order) to the target, each with the sharding its input comes in: place_device runs
    them, prepare_swap compiles them before a swap. A KV projection split along the heads axis (which the
    repeat reshapes) is first resharded on the devices (source_sharding). Where the platform's collectives
    are in-process (IN_PROCESS_COLLECTIVES), a step that needs one (local_slices says which do not) moves
    16-bit floats as their bits and is waited on."""
    import jax.numpy as jnp

    in_process = item.sharding.mesh.devices.flat[0].platform in IN_PROCESS_COLLECTIVES

    def step(op: str, replicas: int, out_dtype, out_sharding, in_sharding) -> DeviceStep:
        wait = in_process and not local_slices(op, shape, in_sharding, out_sharding)
        bits = wait and jnp.issubdtype(out_dtype, jnp.floating) and np.dtype(out_dtype).itemsize == 2
        return DeviceStep(device_transform(op, replicas, num_kv_heads, out_dtype, out_sharding, bits),
                          in_sharding, wait)

    steps = []
    if item.op == "kv_heads" and item.replicas > 1 and sharding.shard_shape(shape)[-1] != shape[-1]:
        steps.append(step("copy", 1, dtype, source_sharding(item, shape), sharding))
        sharding = source_sharding(item, shape)
    return [*steps, step(item.op, item.replicas, item.dtype, item.sharding, sharding)]


def place_device(item: SwapItem, src, num_kv_heads: int, stats: SwapStats | None = None):
    """A trainer-resident source (a jax.Array in any sharding) -> the target, device to device (device_steps).
    A source on another device ORDER than the engine's mesh cannot enter the same jit; it goes through
    jax.device_put, which JAX may route through the host when the slices do not line up (counted in
    device_put_reshards)."""
    import jax

    shape = tuple(src.shape)
    if not same_devices(item, src.sharding):
        src = jax.device_put(src, source_sharding(item, shape))
        if stats is not None:
            stats.device_put_reshards += 1
    for step in device_steps(item, shape, src.dtype, src.sharding, num_kv_heads):
        src = step.fn(src)
        if step.wait:  # never two in-process collectives in flight (IN_PROCESS_COLLECTIVES)
            src.block_until_ready()
    return src


def put(host: np.ndarray, sharding):
    """A host array into `sharding`. One host: jax.device_put. Several: each host puts only the slices its own
    devices hold (jax.make_array_from_callback reads just those from a mapped checkpoint; jax.device_put would
    all-gather every whole tensor across the hosts to check that they agree)."""
    import jax

    if jax.process_count() == 1:
        return jax.device_put(host, sharding)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def index_key(index: tuple) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in index)


def host_shards(arr) -> dict[tuple, np.ndarray]:
    """Host copies of this host's distinct shards of `arr`, by index (a replicated shard once). Reads the
    per-device arrays without `addressable_shards`, for the reason device_buffers gives."""
    where = arr.sharding.addressable_devices_indices_map(arr.shape)
    out: dict[tuple, np.ndarray] = {}
    for i in range(len(arr.sharding.addressable_devices)):
        data = arr.addressable_data(i)
        key = index_key(where[next(iter(data.devices()))])
        if key not in out:
            out[key] = np.asarray(data)
    return out


def from_host_shards(shards: Mapping[tuple, np.ndarray], shape: tuple, sharding):
    """The array host_shards() copied, placed again (on every host, from its own shards)."""
    import jax

    return jax.make_array_from_callback(shape, sharding, lambda index: shards[index_key(index)])


def place(item: SwapItem, src, num_kv_heads: int, stats: SwapStats | None = None, alias: bool = False,
          transpose: str = "device"):
    """The target array of one item, dispatched and not waited on (the swap waits once per bucket). Host
    source: one jax.device_put of the host array into the target sharding (no device-side dtype copy); with
    transpose "device" a kernel goes in as stored, in the mirrored sharding, and one jitted transpose puts it
    in the target's. Device source: place_device, or with `alias` the source's own buffers where it already is
    the target (can_alias, as_target)."""

    if on_devices(src):
        if alias and can_alias(item, src):
            arr = as_target(item, src)
            if stats is not None:
                stats.aliased_bytes_sum += item.nbytes_sum
                stats.aliased.add(id(arr))
            return arr
        transposed = item.op == "transpose"
        arr = place_device(item, src, num_kv_heads, stats)
    else:
        t0 = time.perf_counter()
        host, transposed = host_array(item, src, num_kv_heads, transpose)
        if stats is not None:
            stats.host_s += time.perf_counter() - t0
        if transposed:
            arr = device_transpose(item.sharding)(put(host, mirrored(item.sharding, host.ndim)))
        else:
            arr = put(host, item.sharding)
    if stats is not None:
        stats.copied_bytes_sum += item.nbytes_sum
        stats.transposed_bytes_sum += item.nbytes_sum if transposed else 0
    return arr


@functools.cache
def compiled(fn, shape: tuple, dtype, sharding) -> None:
    """fn compiled for an input of this shape, dtype and sharding (JAX's jit cache keeps it: a later call with
    such an array compiles nothing)."""
    import jax

    fn.lower(jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)).compile()


def prepare_swap(plan: list[SwapItem], source: Mapping[str, Any], num_kv_heads: int, transpose: str,
                 alias: bool, finite: bool = False) -> tuple[float, int]:
    """Compile every jitted function the swap of this tree will run (device sources: device_steps; host
    kernels transposed on the devices: device_transpose; `finite`: the NaN/Inf count of each placed
    array, nonfinite_counter), before generation is paused, so that the swap
    compiles nothing. Reads only shapes, dtypes and shardings (a lazy source's base: nothing is computed).
    Returns (seconds, compiles): a layout swapped before costs lookups and 0 compiles."""
    t, before = time.perf_counter(), count_compiles()
    base = getattr(source, "base", source)
    for item in plan:
        src = base[item.source]
        shape = tuple(src.shape)
        if finite:
            compiled(nonfinite_counter(item.sharding), item.shape, item.dtype, item.sharding)
        if on_devices(src):
            if alias and can_alias(item, src):
                continue
            sharding = src.sharding if same_devices(item, src.sharding) else source_sharding(item, shape)
            for step in device_steps(item, shape, src.dtype, sharding, num_kv_heads):
                compiled(step.fn, shape, src.dtype, step.in_sharding)
        elif transposed_on_device(item, src, transpose):
            compiled(device_transpose(item.sharding), tuple(reversed(item.shape)), item.dtype,
                     mirrored(item.sharding, 2))
    return time.perf_counter() - t, count_compiles() - before


def exponent_mask(dtype) -> tuple[Any, int] | None:
    """(the unsigned integer type of a float's size, its exponent bits): NaN or infinite <=> every exponent
    bit is set (IEEE 754; bfloat16, float16, float32). Counting so in integers is 1.3x faster than isfinite on
    XLA:CPU, which runs bf16 math in f32 (1.56 against 1.17 GB/s), and counts host bf16, which numpy's
    isfinite does not see as a float. None: another dtype (isfinite)."""
    import jax.numpy as jnp

    if not jnp.issubdtype(dtype, jnp.floating) or np.dtype(dtype).itemsize not in (2, 4):
        return None
    info = jnp.finfo(dtype)
    return (np.uint16 if np.dtype(dtype).itemsize == 2 else np.uint32), ((1 << info.nexp) - 1) << info.nmant


@functools.cache
def nonfinite_counter(sharding):
    """A jitted count of the NaN and infinite elements in each device's own shard of an array in `sharding`
    (a NamedSharding): one int32 per device, left on that device. shard_map: no communication between
    devices or hosts, so it never meets a forward's collectives."""
    import jax
    import jax.numpy as jnp

    axes = tuple(sharding.mesh.axis_names)

    def local(x):
        if (bits := exponent_mask(x.dtype)) is None:
            bad = ~jnp.isfinite(x)
        else:
            bad = (jax.lax.bitcast_convert_type(x, bits[0]) & bits[1]) == bits[1]
        return jnp.sum(bad, dtype=jnp.int32).reshape((1,) * len(axes))

    return jax.jit(jax.shard_map(local, mesh=sharding.mesh, in_specs=sharding.spec,
                                 out_specs=jax.sharding.PartitionSpec(*axes), check_vma=False))


def nonfinite_counts(arrays: Mapping[str, Any]) -> dict[str, int]:
    """{name: NaN and infinite elements} of the arrays that hold any (this host's shards; a replicated
    shard once): host arrays counted by numpy, device arrays (NamedSharding) on their devices, dispatched
    together and read back at once (a few bytes per device)."""
    import jax

    counts, pending = {}, {}
    for name, arr in arrays.items():
        if not on_devices(arr):
            host = np.asarray(arr)
            bits = exponent_mask(host.dtype)
            counts[name] = int(np.count_nonzero((host.view(bits[0]) & bits[1]) == bits[1])) if bits else \
                int(np.count_nonzero(~np.isfinite(host))) if host.dtype.kind == "f" else 0
        elif not isinstance(arr.sharding, jax.sharding.NamedSharding):
            counts[name] = int(jax.device_get(jax.numpy.sum(~jax.numpy.isfinite(arr))))
        else:
            pending[name] = (arr, nonfinite_counter(arr.sharding)(arr))
    got = jax.device_get({name: [out.addressable_data(i) for i in range(len(out.sharding.addressable_devices))]
                          for name, (_, out) in pending.items()})
    for name, (arr, out) in pending.items():
        per_device = {next(iter(out.addressable_data(i).devices())): int(np.asarray(v).sum())
                      for i, v in enumerate(got[name])}
        distinct = {index_key(index): device for device, index in
                    arr.sharding.addressable_devices_indices_map(arr.shape).items()}
        counts[name] = sum(per_device[device] for device in distinct.values())
    return {name: n for name, n in counts.items() if n}


FINITE_WHERE = {"target": "placed on the devices, before their assignment", "source": "in the tree, before the swap"}


def check_finite(items: list[SwapItem], arrays: Mapping[str, Any], by: str) -> float:
    """Refuse (exit 2) if any of these items' arrays holds a NaN or an infinity; `arrays` by the items' target
    (placed) or source (the tree itself) names. Returns the seconds it took."""
    t = time.perf_counter()
    found = nonfinite_counts(arrays)
    if found:
        item = {getattr(i, by): i for i in items}
        named = [f"{item[k].source} -> {item[k].target} ({n} of {int(np.prod(arrays[k].shape))})" for k, n in found.items()]
        raise ToolError("weights_finite", f"{len(found)} tensor(s) hold NaN or infinite values ({FINITE_WHERE[by]}): "
                        + ", ".join(named[:5]) + (f" and {len(named) - 5} more" if len(named) > 5 else ""),
                        "a trainer that diverged, or a damaged checkpoint; the engine keeps its previous weights "
                        "(--allow-nonfinite, ParamSwapper(engine, allow_nonfinite=True): swap them knowingly)",
                        EXIT_BAD_INPUT, nonfinite={item[k].source: n for k, n in found.items()})
    return time.perf_counter() - t


# ----------------------------------------------------------------------------------------------
# Phases 4-5: place and swap (streaming: a bucket at a time; bulk: all placed, then all assigned)
# ----------------------------------------------------------------------------------------------


def buckets(plan: list[SwapItem], bucket_bytes: int | None) -> list[list[SwapItem]]:
    """The plan in consecutive buckets of at most `bucket_bytes` device bytes (a larger tensor is a bucket of
    its own; 0: one tensor each); None: one bucket (bulk)."""
    if bucket_bytes is None:
        return [plan] if plan else []
    out: list[list[SwapItem]] = []
    size = 0
    for item in plan:
        if not out or size + item.nbytes_sum > bucket_bytes:
            out.append([])
            size = 0
        out[-1].append(item)
        size += item.nbytes_sum
    return out


@dataclasses.dataclass
class Rollback:
    """How a failed swap puts back the weights it had replaced. kind:
      source: placed again from the tree the previous swap came from (read-only host arrays, kept by reference:
              nothing to do during the swap);
      dummy:  sglang-jax's own dummy initialiser, run again for those Params (the engine still holds the
              weights it started with: nothing to do during the swap);
      copy:   a host copy of each replaced array (this host's shards), made during the swap (backup_s);
      off:    none: a failure mid-swap leaves the engine half-swapped (it is shut down, exit 3).
    Bulk keeps the replaced arrays themselves until all are assigned, so it needs none of these."""

    kind: str
    source: Mapping[str, Any] | None = None
    plan: list[SwapItem] | None = None
    num_kv_heads: int = 0
    model_runner: Any = None
    copies: dict = dataclasses.field(default_factory=dict)

    def backup(self, state: EngineState, items: list[SwapItem]) -> None:
        if self.kind == "copy":
            self.copies.update({i.target: host_shards(state.params[i.target].get_value()) for i in items})

    def arrays(self, items: list[SwapItem]) -> dict[str, Any]:
        """The previous weights of these items, placed again (raises if there is no way)."""
        if self.kind == "copy":
            return {i.target: from_host_shards(self.copies[i.target], i.shape, i.sharding) for i in items}
        if self.kind == "source":
            mine = {i.target: i for i in self.plan}
            return {i.target: place(mine[i.target], self.source[mine[i.target].source], self.num_kv_heads)
                    for i in items}
        if self.kind == "dummy":
            return dummy_weights(self.model_runner, {i.target for i in items})
        raise RuntimeError(f"no rollback ({self.kind})")


def restore(state: EngineState, done: list[SwapItem], kept: Mapping[str, Any], rollback: Rollback) -> bool:
    """Put the previous weights of every assigned item back (the arrays still kept, else from `rollback`),
    then rebind. Nothing assigned yet: the engine is as it was."""
    missing = [i for i in done if i.target not in kept]
    if missing and rollback.kind == "off":
        return False
    try:
        arrays = {**rollback.arrays(missing), **kept} if missing else dict(kept)
        for item in done:
            state.assign(item.target, arrays[item.target])
        state.rebind_from_model()
    except Exception as e:  # noqa: BLE001 - a restore that fails leaves the engine half-swapped: said, not hidden
        log(f"restoring the previous weights failed: {type(e).__name__}: {e}")
        return False
    return True


def place_and_assign(state: EngineState, plan: list[SwapItem], source: Mapping[str, Any], num_kv_heads: int,
                     stats: SwapStats, rollback: Rollback, alias: bool = False) -> dict:
    """Swap every planned tensor into the engine; returns {nnx path: jax.Array}, shared with the engine.

    A bucket at a time (stats.bucket_bytes; bulk: one bucket of everything): place its tensors (dispatched
    together, waited on once), assign them, let go of the arrays they replaced, go on. Peak: one set + one
    bucket (or the largest tensor); bulk: two sets. stats.finite_check "target": each bucket is checked for
    NaN/Inf on the devices before it is assigned (check_finite). If anything fails, the previous weights are
    put back (restore, with `rollback`) and the error is raised as a ToolError.
    """
    import jax

    done: list[SwapItem] = []  # assigned so far
    kept: dict[str, Any] = {}  # the current bucket's replaced arrays, alive until the bucket is assigned
    param_dict: dict[str, Any] = {}
    try:
        for bucket in buckets(plan, stats.bucket_bytes):
            t = time.perf_counter()
            host_s = stats.host_s
            placed = {i.target: place(i, source[i.source], num_kv_heads, stats, alias, stats.transpose) for i in bucket}
            jax.block_until_ready(list(placed.values()))
            stats.put_s += time.perf_counter() - t - (stats.host_s - host_s)
            stats.bucket_tensors.append(len(bucket))
            if stats.finite_check == "target":  # before anything of this bucket is assigned
                stats.finite_check_s += check_finite(bucket, placed, "target")
            stats.sample_peak()
            if rollback.kind == "copy":
                t = time.perf_counter()
                rollback.backup(state, bucket)
                stats.backup_s += time.perf_counter() - t
            t = time.perf_counter()
            for item in bucket:
                kept[item.target] = state.assign(item.target, placed[item.target])
                done.append(item)
            for item in bucket:
                stats.release(kept.pop(item.target))
            stats.assign_s += time.perf_counter() - t
            param_dict.update(placed)
        t = time.perf_counter()
        state.rebind_from_model()
        stats.assign_s += time.perf_counter() - t
    except Exception as e:  # noqa: BLE001 - any failure mid-swap: put the previous weights back, then report
        restored = restore(state, done, kept, rollback)
        if isinstance(e, ToolError):  # input refused mid-swap (check_finite): its own stage and exit code
            e.details.update(restored=restored, rollback=rollback.kind, assigned=len(done))
            raise
        raise ToolError("swap", f"the swap failed after {len(done)} of {len(plan)} tensors were assigned: "
                        f"{type(e).__name__}: {e}",
                        "the previous weights were restored" if restored else
                        "no rollback (--no-rollback, or a device source): the engine is half-swapped and "
                        "is shut down", EXIT_ENGINE, restored=restored, rollback=rollback.kind) from e
    stats.sample_peak()
    return param_dict


def read_only(flat: Mapping[str, Any]) -> bool:
    """A source nobody changes in place: numpy leaves that are not writeable (the tool's own trees, views of a
    mapped checkpoint; a caller sets arr.flags.writeable = False), or a lazy view of such (PerturbedWeights).
    The swapper keeps such a tree by reference as the next swap's free rollback."""
    base = getattr(flat, "base", flat)
    return bool(base) and all(isinstance(a, np.ndarray) and not a.flags.writeable for a in base.values())


def as_flat(mllm_params: Mapping[str, Any]) -> Mapping[str, Any]:
    """The MLLM-JAX tree, nested ({'model': {'layers_0': ...}}) or flat ('model.layers_0....'), as a flat
    mapping. A flat mapping (also a lazy one, like PerturbedWeights: its base is looked at) is used as it is."""
    if any(isinstance(v, Mapping) for v in getattr(mllm_params, "base", mllm_params).values()):
        return flatten(mllm_params)
    return mllm_params


def source_arrays(flat: Mapping[str, Any]) -> list:
    """The arrays behind a flat source (a lazy view such as PerturbedWeights exposes its `base`)."""
    return list(getattr(flat, "base", flat).values())


# ----------------------------------------------------------------------------------------------
# Pausing generation around a swap: pause (retract), flush the radix cache, continue (ServeGuard's hooks)
# ----------------------------------------------------------------------------------------------

PAUSE_WAIT_S = 120.0  # how long a swap waits for the scheduler to confirm it paused


async def continue_generation(guard: ServeGuard) -> None:
    guard.hold_waiting = False  # rank >= 1: set since its pause (rank 0's flush is over or will not come)
    if HOSTS.rank:  # rank 0's reaches this host's scheduler
        return
    await guard.send_continue()


async def pause_generation(guard: ServeGuard, pauses: int) -> int:
    """pause_generation(retract), then wait until the scheduler's own thread has handled it with nothing
    left running (the tokenizer manager's pause only sends the request; ServeGuard's hook on the scheduler
    records when it is done). `pauses`: the guard's count before this pause. Returns the requests the
    scheduler holds. Rank >= 1 of several hosts: rank 0's pause reaches this host's scheduler too (it
    forwards every request); wait for it, then hold its waiting requests aside for rank 0's flush to come."""
    if HOSTS.rank == 0:
        await guard.send_pause()
    deadline = time.perf_counter() + PAUSE_WAIT_S
    while guard.pauses == pauses or guard.paused_requests is None:
        if time.perf_counter() > deadline:
            await continue_generation(guard)
            error = ToolError("swap_pause", f"the scheduler did not confirm the pause within {PAUSE_WAIT_S:.0f} s"
                              + ("" if guard.pauses == pauses else " (requests were still running)"),
                              "nothing was swapped; generation continues", EXIT_ENGINE)
            HOSTS.fail(error)
            raise error
        await asyncio.sleep(0.002)
    guard.hold_waiting = HOSTS.rank > 0
    guard.flushes_at_pause = guard.flushes  # rank 0's flush can reach this scheduler before flush_radix_cache runs
    return guard.paused_requests


def agree_paused(guard: ServeGuard, pauses: int) -> None:
    """Every rank's scheduler confirmed this swap's pause with nothing running (its own hook's record, not
    the waiting above) before any rank touches a Param; else none does (generation continues), exit 3."""
    mine = {"pauses": guard.pauses - pauses, "running": guard.paused_requests is None}
    seen = HOSTS.agree("swap_paused", mine)
    late = [r for r, s in enumerate(seen) if s["pauses"] < 1 or s["running"]]
    if late:
        raise ToolError("swap_pause", f"rank(s) {late} had not paused generation when the swap was to start: "
                        + "; ".join(f"rank {r}: {s['pauses']} pause(s) handled, requests "
                                    f"{'still running' if s['running'] else 'paused'}" for r, s in enumerate(seen)),
                        "nothing was swapped (a forward there would mix weight sets); generation continues",
                        EXIT_ENGINE, not_paused_ranks=late, failed_rank=late[0])


FLUSH_WAIT_S = 60.0  # rank >= 1: how long it waits for rank 0's flush to reach its scheduler


async def flush_radix_cache(guard: ServeGuard) -> int:
    """The scheduler's flush_cache with the waiting (retracted) requests held aside, on every rank (rank 0's
    reaches the others' schedulers), and proven: every rank's flush succeeded and left its radix cache empty
    (stale prefix KV of the old weights would survive a refused or skipped flush: an error, generation stays
    paused). Returns how many requests were held aside (rank 0's)."""
    flushes = guard.flushes_at_pause
    if HOSTS.rank == 0:
        await guard.send_flush()
    deadline = time.perf_counter() + FLUSH_WAIT_S
    while guard.flushes == flushes and time.perf_counter() < deadline:
        await asyncio.sleep(0.002)
    guard.hold_waiting = False
    mine = dict(guard.last_flush) if guard.flushes > flushes else {"success": False, "message": "no flush arrived "
                                                                   f"within {FLUSH_WAIT_S:.0f} s", "held": 0,
                                                                   "radix_tokens_after": None}
    seen = HOSTS.agree("swap_flushed", mine)
    bad = [r for r, f in enumerate(seen) if not f["success"] or f["radix_tokens_after"]]
    if bad:
        why = {r: seen[r]["message"] or f"it succeeded, yet {seen[r]['radix_tokens_after']} tokens are still cached"
               for r in bad}
        raise ToolError("swap_flush", "the radix cache flush was refused or incomplete: " + (
            "; ".join(f"rank {r}: {w}" for r, w in why.items()) if HOSTS.multi else why[0]),
            "generation stays paused: the cache may hold prefix KV of the previous weights",
            EXIT_ENGINE, generation="paused", flushes=seen, failed_rank=bad[0])
    return seen[0]["held"]


# ----------------------------------------------------------------------------------------------
# Rollback: which kind a swap gets, chosen before it starts (Rollback, above, does it)
# ----------------------------------------------------------------------------------------------


def holds_dummy_weights(state: EngineState) -> bool:
    """The engine's smallest Param equals sglang-jax's dummy initialiser run again (then a failed first
    swap can re-create the dummy weights instead of copying them: Rollback "dummy")."""
    path, param = min(state.params.items(), key=lambda kv: param_bytes_sum([kv[1].get_value()]))
    try:
        again = dummy_weights(state.model_runner, {path})[path]
    except (RuntimeError, AttributeError, TypeError, KeyError, ValueError) as e:  # another sglang-jax version
        log(f"sglang-jax's dummy initialiser could not be run again ({type(e).__name__}: {e}): a rollback "
            "will copy the dummy weights")
        return False
    mine, theirs = host_shards(param.get_value()), host_shards(again)
    if mine.keys() != theirs.keys() or not all(np.array_equal(mine[k], theirs[k]) for k in mine):
        log(f"the engine's {path} is not sglang-jax's dummy initialisation: a rollback will copy it")
        return False
    return True


def choose_rollback(mode: str, rollback: bool | None, device: bool, free: Rollback | None,
                    model_runner) -> Rollback:
    """The swap's Rollback. bulk: "kept" (the replaced arrays stay alive until every one is assigned).
    rollback None: the free kind where there is one (`free`: the engine's weights can be re-created, "dummy"
    or "source"), else a host copy of each replaced array for host sources and none for device sources (a
    copy would go device->host; without one the swap runs under JAX's device-to-host transfer guard, which
    proves on TPU/GPU that nothing leaves the devices). True: a copy where nothing is free. False: none."""
    if mode == "bulk":
        return Rollback("kept")
    if rollback is False:
        return Rollback("off")
    if free is not None:
        return dataclasses.replace(free)
    return Rollback("copy" if rollback or not device else "off", model_runner=model_runner)


@dataclasses.dataclass
class UndoPoint:
    """Taken just before a swap changes the engine; agree_swapped undoes the swap with it if the hosts
    disagree, and drops it otherwise (a rollback's copies live no longer than the swap)."""
    swaps: int  # swaps completed before this one
    free_rollback: Rollback | None  # how the weights before this swap could be re-created for free
    rollback: Rollback  # this swap's


# ----------------------------------------------------------------------------------------------
# Several hosts: every host swaps the same plan and completes it, or none keeps it
# ----------------------------------------------------------------------------------------------


def agree_plan(plan: list[SwapItem]) -> None:
    """Several hosts: every host is about to swap the same plan, or none touches its engine."""
    plans = HOSTS.agree("swap_plan", plan_fingerprint(plan))
    if len(set(plans)) > 1:
        raise ToolError("swap_agreement", "the hosts planned different swaps: " + ", ".join(
            f"rank {r} {p}" for r, p in enumerate(plans)), "every host must swap the same tree (names, shapes, "
            "dtypes) into the same engine; nothing was swapped", EXIT_BAD_INPUT, plans=plans)


def undo_swap(swapper: ParamSwapper, plan: list[SwapItem], undo: UndoPoint) -> bool:
    """Put back the weights a completed swap replaced (with its Rollback), as if it had failed."""
    swapper.guard.changing = True
    restored = restore(swapper.state, plan, {}, undo.rollback)
    swapper.last_swap_restored = restored
    swapper.guard.changing = not restored
    if restored:
        swapper.swaps, swapper.free_rollback, swapper.guard.weights_id = undo.swaps, undo.free_rollback, undo.swaps
    else:
        swapper.free_rollback = None
    return restored


def agree_swapped(swapper: ParamSwapper, plan: list[SwapItem], param_dict: Mapping[str, Any],
                  error: ToolError | None, undo: UndoPoint | None) -> ToolError | None:
    """Several hosts: every host completed this swap, or none keeps it. Each host's completed swaps, plan,
    error, and how many of its engine's Params (and their model_state_leaves entries) are now this swap's
    arrays (what the engine holds, not what the swap says it did) are compared; on any difference every
    host puts its previous weights back (undo_swap), and all raise the same error: the first failed host's,
    else swap_agreement (exit 1: a partial swap, which would otherwise generate with mixed weights and no
    error at all). One host: `error` as it is."""
    if not HOSTS.multi:
        return error
    state = swapper.state
    leaves, where = state.leaves(), state.leaf_index
    held = sum(state.params[p].get_value() is a and leaves[where[p]] is a for p, a in param_dict.items())
    seen = HOSTS.agree("swap_done", {"swaps": swapper.swaps, "plan": plan_fingerprint(plan), "params_held": held,
                                     "error": error.record() if error is not None else None})
    if error is None and all(s == seen[0] for s in seen) and held == len(plan):
        return None
    restored = undo_swap(swapper, plan, undo) if error is None else bool(error.details.get("restored"))
    everywhere = all(HOSTS.agree("swap_undone", restored))
    failed = [(r, s["error"]) for r, s in enumerate(seen) if s["error"]]
    hosts = [{"rank": r, "swaps_completed": s["swaps"], "plan": s["plan"], "params_held": s["params_held"],
              "error": s["error"]["error"] if s["error"] else None} for r, s in enumerate(seen)]
    if failed:
        r, rec = failed[0]
        out = ToolError(rec["stage"], f"rank {r}: {rec['error']}", rec["hint"], rec["exit_code"], failed_rank=r)
    else:
        short = [r for r, s in enumerate(seen) if s["params_held"] != len(plan)] or \
            [r for r, s in enumerate(seen) if (s["swaps"], s["plan"]) != (seen[0]["swaps"], seen[0]["plan"])]
        out = ToolError("swap_agreement", f"the hosts did not all complete the swap: rank(s) {short} differ ("
                        + "; ".join(f"rank {h['rank']}: {h['params_held']} of {len(plan)} Params swapped, "
                                    f"{h['swaps_completed']} swaps completed" for h in hosts) + ")",
                        "a partial swap (a host skipped or lost part of it); the previous weights were put back "
                        "on every host" if everywhere else "a partial swap: the engine holds mixed weights",
                        EXIT_CHECK_FAILED, failed_rank=short[0] if short else 0)
    out.details.update(restored=everywhere, rollback=undo.rollback.kind, hosts=hosts)
    return out


# ----------------------------------------------------------------------------------------------
# The swap's figures: the memory split and the report (the phase JSON's weights_swapped_from_mllm)
# ----------------------------------------------------------------------------------------------


def leaves_unchanged(state: EngineState, param_dict: Mapping[str, Any], stats: SwapStats) -> tuple[bool, dict]:
    """Same leaf count and treedef as the dummy engine; every swapped Param and leaf is the dict's array; no
    leaf is a deleted buffer; and every array the swap replaced is gone (nothing still references it)."""
    import jax
    from flax import nnx

    leaves = state.leaves()
    treedef = jax.tree_util.tree_flatten(nnx.split(runner_model(state.model_runner))[1])[1]
    stale = [p for p in param_dict
             if state.params[p].get_value() is not param_dict[p] or leaves[state.leaf_index[p]] is not param_dict[p]]
    deleted = [state.leaf_paths[i] for i, leaf in enumerate(leaves) if leaf.is_deleted()]
    alive = stats.still_alive()
    ok = (len(leaves) == len(state.leaf_paths) and treedef == state.treedef and not stale and not deleted
          and alive == 0 and len(param_dict) == len(state.params))
    return ok, {"num_leaves": len(leaves), "expected_leaves": len(state.leaf_paths),
                "treedef_equal": treedef == state.treedef, "params_swapped": len(param_dict),
                "params_in_model": len(state.params), "not_the_new_array": stale[:10], "deleted": deleted[:10],
                "replaced_still_alive": alive}


def memory_split(state: EngineState, guard: ServeGuard, mllm_params: Mapping[str, Any] | None = None,
                 memory: dict | None = None, held: Mapping[str, Any] | None = None) -> dict:
    """Device bytes in use (now, or in the `memory` sample just taken), split: the trainer's arrays (a device
    source, and `held`: other trees the trainer holds on the devices), the part of them the engine does not
    share (trainer_only), the buffers the batch of a paused or idle scheduler still holds (serving:
    ServeGuard.serving_bytes), and the rest (the engine: its weights, KV cache, everything else). Several
    hosts: summed over every host (collective: every rank calls it)."""
    total = bytes_in_use_sum(memory or device_memory())
    engine_buffers = {(d.id, p) for v in state.params.values() for d, p, _ in device_buffers(v.get_value())}
    trainer: dict[tuple[int, int], int] = {}
    for tree in (mllm_params, held):
        for a in source_arrays(as_flat(tree)) if tree is not None else []:
            if on_devices(a) and not a.is_deleted():
                trainer.update({(d.id, p): n for d, p, n in device_buffers(a)})
    trainer_only = sum(n for k, n in trainer.items() if k not in engine_buffers)
    serving = guard.serving_bytes(engine_buffers | set(trainer))
    split = {"bytes_in_use_sum_after_swap": total, "trainer_bytes_sum": sum(trainer.values()),
             "trainer_only_bytes_sum": trainer_only, "serving_bytes_sum": serving,
             "engine_bytes_sum": total - trainer_only - serving}
    hosts = HOSTS.agree("memory_split", split)
    return {k: sum(h[k] for h in hosts) for k in split}


@dataclasses.dataclass
class SwapTimes:
    """perf_counter marks of one swap: start, paused, swapped (changed + memory taken), flushed, continued."""
    start: float
    paused: float
    change_s: float  # the engine's change itself (place, assign, rebind), the memory samples left out
    flush_start: float
    flushed: float
    continued: float


def swap_report(plan: list[SwapItem], swapped: int, stats: SwapStats, before: int, times: SwapTimes, alias: bool,
                rollback: Rollback, leaves_ok: bool, split: dict, memory: dict, paused: int, held: int,
                guard: ServeGuard) -> dict:
    """What one swap did and cost: the phase JSON's weights_swapped_from_mllm (docs/phases.md, docs/api.md)."""
    param_bytes = sum(i.nbytes_sum for i in plan)
    swap_s = times.change_s + times.flushed - times.flush_start
    stopped = times.continued - times.start
    return {"swap_s": round(swap_s, 4), "flush_s": round(times.flushed - times.flush_start, 4),
            "num_swapped": swapped, "param_bytes_sum": param_bytes, "alias": alias,
            "rollback": rollback.kind != "off", "rollback_kind": rollback.kind, **stats.as_json(),
            "bytes_in_use_sum_before_swap": before,
            "swap_peak_extra_ratio": round((stats.peak_bytes_in_use_sum - before) / param_bytes, 4),
            "leaves_unchanged": leaves_ok, **split, "memory": memory,
            "pause_mode": PAUSE_MODE, "pause_s": round(times.paused - times.start, 4),
            "serving_stopped_s": round(stopped, 4), "serving_stopped_ratio": round(stopped / max(swap_s, 1e-9), 3),
            "requests_paused": paused, "requests_held_in_flush": held,
            "prefill_requests_retracted": guard.retracted_prefills}


def run_on_engine_loop(engine, coro):
    """Run a coroutine on the engine's event loop from synchronous code (the loop must not be running:
    sglang-jax's own sync calls have the same rule)."""
    loop = engine_loop(engine)
    if loop.is_running():
        coro.close()
        raise ToolError("arguments", "the engine's event loop is running (a generation or a swap is in "
                        "progress on it)", "from a coroutine on engine.loop, await swapper.swap_async(...); "
                        "from synchronous code, call swap() while no engine call runs")
    return loop.run_until_complete(coro)


# ----------------------------------------------------------------------------------------------
# ParamSwapper: the API an RL loop imports (the CLI runs on it too)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SwapResult:
    report: dict  # swap_report: what swap() and swap_async() return
    arrays: dict  # {nnx path: the engine's new array} (the CLI's --keep-param-dict, param_sharing_check)
    leaves: dict  # the leaves_unchanged check's details


class ParamSwapper:
    """Swap MLLM-JAX param trees into a running sglang-jax Engine, in place. docs/api.md has the contract
    and an example.

        swapper = ParamSwapper(engine)
        report = swapper.swap(mllm_params, mode="streaming", alias=False)   # the phase JSON's dict
        report = await swapper.swap_async(mllm_params)   # from a coroutine on engine.loop (while serving)

    Sources: numpy leaves (host: placed with device_put) or jax.Array leaves on the engine's devices in ANY
    sharding (trainer-resident: cast, transposed, KV heads repeated and resharded on the devices, no host
    round trip). The plan (target paths, shapes, dtypes, shardings: the engine's own Params) is made once per
    tree layout and validated whole before anything touches the engine. `alias=True` lets a Param BE the
    trainer's array where it already is the target (can_alias): no copy, but a trainer step that donates
    that buffer deletes the engine's weight (check_live and generate() catch it).

    Every swap pauses generation (retract), swaps, flushes the radix cache (a refused flush is an error) and
    continues: requests in flight keep their tokens so far and finish on the new weights (ServeGuard).
    """

    def __init__(self, engine, num_kv_heads: int | None = None, bucket_mb: float = DEFAULT_BUCKET_MB,
                 transpose: str = "auto", allow_nonfinite: bool = False):
        probe_sglang()  # exit 2 if the installed sglang-jax lacks what the adapter uses
        if engine_scheduler(engine) is None:
            raise ToolError("arguments", "the engine has no in-process scheduler (not enable_single_process, or "
                            "rank >= 1 of several hosts started with Engine(...))", "start it with "
                            "enable_single_process=True; on several hosts with run_param_swap.start_engine(kwargs)")
        model_runner = engine_model_runner(engine)
        request_recorder(engine)  # generate_greedy() reads the scheduler's own ids from it
        self.engine, self.state = engine, EngineState(model_runner)
        self.guard = serve_guard(engine)
        facts = runner_facts(model_runner)
        self.num_kv_heads = num_kv_heads or facts["num_kv_heads"]
        self.arch, self.moe_backend = facts["arch"], facts["moe_backend"]
        self.plans: dict[tuple, list[SwapItem]] = {}
        self.swaps = 0  # swaps completed
        self.shared_ids: set[int] = set()  # ids of the engine's arrays taken from a trainer by the last swap
        self.idle = threading.Event()  # clear while a swap changes the engine (the Stopper waits for it)
        self.idle.set()
        self.last_swap_restored: bool | None = None  # a failed swap: were the previous weights put back
        self.bucket_mb = bucket_mb  # streaming: MB placed before they are assigned (0: one tensor at a time)
        self.allow_nonfinite = allow_nonfinite  # True: NaN/Inf weights are swapped in, not refused (exit 2)
        platform = next(iter(self.state.params.values())).get_value().sharding.mesh.devices.flat[0].platform
        self.transpose = TRANSPOSE_ON.get(platform, "device") if transpose == "auto" else transpose
        # how the engine's weights can be re-created for free when a swap fails: sglang-jax's dummy initialiser
        # at start (load_format="dummy"), the previous read-only host tree after a swap; None: they cannot
        dummy = engine_loaded_dummy(engine) and holds_dummy_weights(self.state)
        self.free_rollback: Rollback | None = Rollback("dummy", model_runner=model_runner) if dummy else None

    @property
    def mesh(self):
        """The engine's device mesh. A trainer mesh over mesh.devices (in that order) lets every tensor go
        device to device in one jitted transform; another device order goes through jax.device_put."""
        return next(iter(self.state.params.values())).get_value().sharding.mesh

    def plan(self, mllm_params: Mapping[str, Any]) -> list[SwapItem]:
        """The validated plan for this tree's layout (made once per set of names and shapes)."""
        flat = as_flat(mllm_params)
        base = getattr(flat, "base", flat)
        key = tuple((k, tuple(base[k].shape)) for k in sorted(base))
        if key not in self.plans:
            self.plans[key] = plan_swap(flat, self.state.params, self.num_kv_heads, self.arch, self.moe_backend)
        return self.plans[key]

    def swap(self, mllm_params: Mapping[str, Any], mode: str = "streaming", alias: bool = False,
             rollback: bool | None = None) -> dict:
        """Swap the tree in; returns the report (seconds, bytes, peak, serving stop, checks). Raises ToolError
        on bad input (nothing touched) or a failed swap (restored says whether the previous weights are back)."""
        return run_on_engine_loop(self.engine, self.swap_async(mllm_params, mode, alias, rollback))

    async def swap_async(self, mllm_params: Mapping[str, Any], mode: str = "streaming", alias: bool = False,
                         rollback: bool | None = None) -> dict:
        """swap() for a coroutine on engine.loop, e.g. while async_generate requests are in flight."""
        return (await self._swap(mllm_params, mode, alias, rollback)).report

    def generate(self, prompt: str, max_new_tokens: int, logprobs: bool = False) -> dict:
        """Greedy generation through the tool's path (checks the weights are live; the scheduler's own ids)."""
        return generate_greedy(self.engine, prompt, max_new_tokens, logprobs)

    def check_live(self) -> None:
        """Raise a clear ToolError if any engine weight buffer was deleted (a trainer donated an aliased array)."""
        check_live(self.engine)

    async def _swap(self, mllm_params: Mapping[str, Any], mode: str = "streaming", alias: bool = False,
                    rollback: bool | None = None, plan: list[SwapItem] | None = None,
                    trainer_held: Mapping[str, Any] | None = None) -> SwapResult:
        """The one path of every swap (swap(), swap_async(), the CLI): validate, compile what the swap runs
        (prepare_swap), then pause generation, change the engine, flush the radix cache, continue. A failed
        swap that was rolled back flushes and continues too (requests finish on the previous weights); one
        that could not be rolled back leaves generation paused (the engine is half-swapped) and says so.
        `trainer_held`: another tree the trainer holds on the devices meanwhile (counted as the trainer's)."""
        pauses = self.guard.pauses  # before rank 0 of several hosts can send the pause (after the plan step)
        try:
            flat, plan, device, rollback, finite = self._validate(mllm_params, mode, alias, rollback, plan)
        except ToolError as e:
            HOSTS.fail(e)  # several hosts: the others stop at the next step
            raise
        prepared = prepare_swap(plan, flat, self.num_kv_heads, "device" if device else self.transpose, alias,
                                finite[0] == "target")
        agree_plan(plan)
        start = time.perf_counter()
        paused = await pause_generation(self.guard, pauses)
        try:
            agree_paused(self.guard, pauses)
        except ToolError:
            await continue_generation(self.guard)
            raise
        paused_at = time.perf_counter()
        error, param_dict = None, {}
        undo = UndoPoint(self.swaps, self.free_rollback, rollback)  # agree_swapped may undo the swap with it
        try:
            param_dict, stats, before, change_s = self._change_engine(flat, plan, device, mode, alias, rollback,
                                                                      prepared, finite)
        except ToolError as e:
            error = e
        error = agree_swapped(self, plan, param_dict, error, undo)
        if error is not None:
            if error.details.get("restored"):
                await flush_radix_cache(self.guard)
                await continue_generation(self.guard)
                error.details["generation"] = "continued on the previous weights"
            else:
                error.details["generation"] = "paused: the engine is half-swapped"
            raise error
        memory = device_memory(collect=False)  # still paused: no forward's temporaries in flight
        split = memory_split(self.state, self.guard, flat, memory, trainer_held)  # the paused batch's buffers now
        flush_start = time.perf_counter()
        held = await flush_radix_cache(self.guard)
        flushed = time.perf_counter()
        await continue_generation(self.guard)
        times = SwapTimes(start, paused_at, change_s, flush_start, flushed, time.perf_counter())
        ok, details = leaves_unchanged(self.state, param_dict, stats)  # read-only: after serving goes on
        report = swap_report(plan, len(param_dict), stats, before, times, alias, rollback, ok, split, memory, paused,
                             held, self.guard)
        return SwapResult(report, param_dict, details)

    def _validate(self, mllm_params, mode: str, alias: bool, rollback: bool | None, plan) -> tuple:
        """Everything checked before the engine is touched: mode, plan, live sources, alias; the Rollback; and
        how the weights are checked for NaN/Inf: (kind, seconds so far). Each bucket as it is placed, on the
        devices (check_finite "target"), where a failure mid-swap can be rolled back; without a rollback, the
        tree itself first ("source", before generation is paused); "off" with allow_nonfinite."""
        if mode not in ("streaming", "bulk"):
            raise ToolError("arguments", f"swap mode {mode!r}", "streaming or bulk")
        flat = as_flat(mllm_params)
        plan = plan or self.plan(flat)
        arrays = source_arrays(flat)
        device = bool(arrays) and all(on_devices(a) for a in arrays)
        deleted = [k for k, a in getattr(flat, "base", flat).items() if on_devices(a) and a.is_deleted()]
        if deleted:
            raise ToolError("plan", f"{len(deleted)} source array(s) were deleted: {', '.join(deleted[:3])}",
                            "the trainer donated or deleted them; swap a live tree")
        if alias and not device:
            raise ToolError("arguments", "alias needs a device source (jax.Array leaves)",
                            "a host tree is always copied to the devices")
        rollback = choose_rollback(mode, rollback, device, self.free_rollback, self.state.model_runner)
        if self.allow_nonfinite:
            return flat, plan, device, rollback, ("off", 0.0)
        if rollback.kind != "off":
            return flat, plan, device, rollback, ("target", 0.0)
        arrays = {i.source: flat[i.source] for i in plan}  # a lazy tree's arrays one at a time
        try:
            return flat, plan, device, rollback, ("source", check_finite(plan, arrays, "source"))
        except ToolError as e:
            e.details.update(assigned=0, rollback=rollback.kind)  # the engine was not touched
            raise

    def _change_engine(self, flat, plan: list[SwapItem], device: bool, mode: str, alias: bool,
                       rollback: Rollback, prepared: tuple[float, int],
                       finite: tuple[str, float]) -> tuple[dict, SwapStats, int, float]:
        """The engine's change, with generation paused: place, assign, rebind, release (place_and_assign).
        Returns the new arrays, the stats, the bytes in use before and the seconds it took (the memory
        samples left out). `prepared`: prepare_swap's (seconds, compiles); `finite`: _validate's NaN/Inf check."""
        import contextlib

        import jax

        bucket = None if mode == "bulk" else int(self.bucket_mb * 2**20)
        stats = SwapStats(mode, source="device" if device else "host", shared=self.shared_ids,
                          transpose="device" if device else self.transpose, bucket_bytes=bucket,
                          prepare_s=prepared[0], prepare_compiles=prepared[1], finite_check=finite[0],
                          finite_check_s=finite[1])
        before = bytes_in_use_sum(device_memory(collect=False))  # no gc pass: generation is paused
        no_host = device and rollback.kind != "copy"
        guard = jax.transfer_guard_device_to_host("disallow") if no_host else contextlib.nullcontext()
        t, compiles = time.perf_counter(), count_compiles()
        self.idle.clear()
        self.guard.changing = True
        try:
            with guard:
                param_dict = place_and_assign(self.state, plan, flat, self.num_kv_heads, stats, rollback, alias)
            stats.swap_compiles = count_compiles() - compiles
            self.swaps += 1
            self.guard.weights_id = self.swaps
            self.guard.changing = False
            self.shared_ids, self.last_swap_restored = stats.aliased, None
            self.free_rollback = Rollback("source", source=flat, plan=plan, num_kv_heads=self.num_kv_heads) \
                if read_only(flat) else None
        except ToolError as e:
            self.last_swap_restored = e.details.get("restored")
            self.guard.changing = not self.last_swap_restored  # restored: the previous set, whole again
            if not self.last_swap_restored:
                self.free_rollback = None
            raise
        finally:
            self.idle.set()
        return param_dict, stats, before, time.perf_counter() - t - stats.meter_s


# ----------------------------------------------------------------------------------------------
# --serve-load: requests in flight across every swap, and the three checks on them
# ----------------------------------------------------------------------------------------------

SERVE_WAIT_S = 300.0  # longest wait for load requests to reach the scheduler or to finish


class ServeLoad:
    """--serve-load N (made only then, by start_serve_load): N clients on the engine's event loop, each sending
    greedy requests one after another (LOAD_PROMPTS; max_new_tokens/4 .. 2 x max_new_tokens tokens), kept in
    flight across the first swap and every --rounds swap (each request in flight at a pause spans that swap).
    The checked prompt runs through generate_alone(): the clients hold and the requests in flight finish
    first, so its answer is computed alone, like its reference (batched bf16 answers differ from solo ones at
    near-ties).

    Several hosts: the clients run on rank 0 (its scheduler hands every request on to the others'); the
    other ranks follow (`leader` False): the same swaps, generations and phases in the same order, no
    clients, no waits of their own; every rank's forward steps are checked (check_forwards)."""

    def __init__(self, engine, swapper: ParamSwapper, cfg):
        self.engine, self.swapper, self.cfg, self.clients = engine, swapper, cfg, cfg.serve_load
        self.leader = HOSTS.rank == 0
        m = cfg.max_new_tokens
        self.lengths = [max(1, m // 4), max(1, m // 2), m, 2 * m]
        self.prompts = load_prompts(engine_tokenizer(engine), cfg.prompt) if self.leader else []
        self.requests: list[dict] = []  # every finished load request
        self.live: dict[int, tuple[int, int]] = {}  # requests in flight: (max_new_tokens, forward steps at submission)
        self.tasks: list = []
        self.go = None  # asyncio.Event: clients may send (cleared by drain())
        self.stopping = False
        self.t0 = time.perf_counter()
        self.forwards_at_start = 0
        self.swaps: list[dict] = []  # every swap made while the load ran
        self.fresh: list[dict] = []  # the checked prompt's answer right after each swap: {swap, weights, answer}
        self.pending: tuple | None = None  # (swap label, weights) whose answer has not been taken yet
        self.unfinished = 0

    @property
    def in_flight(self) -> int:
        return len(self.live)

    def now(self) -> float:
        return round(time.perf_counter() - self.t0, 3)

    async def client(self, i: int) -> None:
        recorder, k = request_recorder(self.engine), 0
        while True:
            await self.go.wait()
            if self.stopping:
                return
            j, n = (i + k) % len(self.prompts), self.lengths[(i + k) % len(self.lengths)]
            k += 1
            rec = {"client": i, "prompt": j, "max_new_tokens": n, "submitted_s": self.now()}
            self.live[id(rec)] = (n, self.swapper.guard.forwards)
            try:
                out = await self.engine.async_generate(prompt=self.prompts[j], sampling_params=greedy(n))
                meta = out["meta_info"]
                rec.update(finish=(meta.get("finish_reason") or {}).get("type"), completion_tokens=meta.get(
                    "completion_tokens"), tokens=len(recorder.take(meta["id"])["output_ids"]))
            except Exception as e:  # noqa: BLE001 - a request that errors is what serve_no_lost_requests counts
                rec["error"] = f"{type(e).__name__}: {e}"
            finally:
                del self.live[id(rec)]
                rec["done_s"] = self.now()
                self.requests.append(rec)

    async def wait_for(self, what: str, ready) -> None:
        deadline = time.perf_counter() + SERVE_WAIT_S
        while not ready():
            if time.perf_counter() > deadline:
                raise ToolError("serve_load", f"{what} did not happen within {SERVE_WAIT_S:.0f} s",
                                "the engine stopped serving the load", EXIT_ENGINE)
            await asyncio.sleep(0.01)

    async def busy(self) -> None:
        """Every client has a request in flight, the engine ran forward steps since, and a request of the
        longest kind is 1-3 forward steps old (rank 0). So the next pause finds requests to hold: without the
        young request, every request in flight could finish before the pause is handled (seen on
        0.1.0rc0-jax0.11: a swap of the requests/s window paused none, 1 run in 3)."""
        if not self.leader:
            return
        self.go.set()
        await self.wait_for("every client sending a request", lambda: self.in_flight >= self.clients)
        g, start, longest = self.swapper.guard, self.swapper.guard.forwards, max(self.lengths)
        await self.wait_for("forward steps with the load, and a young long request", lambda: g.forwards >= start + 2
                            and any(n == longest and 1 <= g.forwards - f <= 3 for n, f in self.live.values()))

    def start(self, phases: PhaseLog) -> None:
        async def start():
            self.go = asyncio.Event()
            self.tasks = [asyncio.ensure_future(self.client(i)) for i in range(self.clients if self.leader else 0)]
            await self.busy()

        phases.begin("serve_load_started")
        self.forwards_at_start = self.swapper.guard.forwards
        run_on_engine_loop(self.engine, start())
        phases.phase("serve_load_started", clients=self.clients, prompts=self.prompts, max_new_tokens=self.lengths,
                   in_flight=self.in_flight, pause_mode=PAUSE_MODE)

    async def swap_under_load(self, source, plan, alias: bool, label: str, weights: str,
                              fresh: bool = True, trainer_held: Mapping[str, Any] | None = None) -> SwapResult:
        """One swap (ParamSwapper's path) once every client has a request in flight; recorded in `swaps`."""
        await self.busy()
        entry = {"swap": label, "weights": weights, "start_s": self.now()}
        self.swaps.append(entry)
        try:
            result = await self.swapper._swap(source, self.cfg.swap_mode, alias, self.cfg.rollback, plan,
                                              trainer_held)
        except ToolError as e:
            g = self.swapper.guard
            entry.update(failed=e.error, restored=e.details.get("restored"), end_s=self.now(),
                         forwards_at_failure=g.forwards, on_previous_at_failure=g.by_weights.get(g.weights_id, 0))
            raise
        report = result.report
        entry.update(end_s=self.now(), swap_s=report["swap_s"], serving_stopped_s=report["serving_stopped_s"],
                     serving_stopped_ratio=report["serving_stopped_ratio"], requests_paused=report["requests_paused"])
        self.pending = (label, weights) if fresh else None
        return result

    def hold(self) -> None:
        """Hold the clients and let the requests in flight finish (the next generate_alone() lets them go).
        Several hosts: every rank goes on once rank 0's requests have finished (its memory is sampled next)."""
        if not self.stopping:
            run_on_engine_loop(self.engine, self.drain())
            HOSTS.agree("serve_held")

    async def drain(self) -> None:
        self.go.clear()
        if not self.leader:
            return
        await self.wait_for("the load's requests in flight finishing", lambda: self.in_flight == 0)

    def generate_alone(self, prompt: str, max_new_tokens: int, logprobs: bool = False) -> dict:
        """generate_greedy(), alone: with the load held and its requests in flight finished first."""
        if self.stopping:
            return generate_greedy(self.engine, prompt, max_new_tokens, logprobs)
        run_on_engine_loop(self.engine, self.drain())
        try:
            out = generate_greedy(self.engine, prompt, max_new_tokens, logprobs)
        finally:
            self.go.set()
        if self.pending:
            self.fresh.append({"swap": self.pending[0], "weights": self.pending[1], "answer": out})
            self.pending = None
        return out

    def finish(self) -> None:
        """Stop the clients and let every request in flight complete."""
        if self.stopping:
            return

        async def finish():
            self.stopping = True
            self.go.set()
            if self.tasks:
                done, pending = await asyncio.wait(self.tasks, timeout=SERVE_WAIT_S)
                self.unfinished = len(pending)

        run_on_engine_loop(self.engine, finish())

    def throughput(self, seconds: float, swaps: list[tuple]) -> dict:
        """Requests completed per second in a window of `seconds` without a swap, then in one as long with
        `swaps` ((source, plan, alias, weights), evenly spaced) made while serving."""
        async def window(with_swaps: list) -> tuple[float, int, int]:
            await self.busy()
            t, n, f = time.perf_counter(), len(self.requests), self.swapper.guard.forwards
            for k, (source, plan, alias, weights) in enumerate(with_swaps):
                if self.leader:  # the others swap when rank 0 does (its steps wait for them)
                    await asyncio.sleep(max(0.0, t + seconds * (k + 1) / (len(with_swaps) + 1) - time.perf_counter()))
                await self.swap_under_load(source, plan, alias, f"throughput {k + 1}", weights, fresh=False)
            await asyncio.sleep(max(0.0, t + seconds - time.perf_counter()))
            return time.perf_counter() - t, len(self.requests) - n, self.swapper.guard.forwards - f

        s0, n0, f0 = run_on_engine_loop(self.engine, window([]))
        s1, n1, f1 = run_on_engine_loop(self.engine, window(swaps))
        if not self.leader:
            return {"window_s": seconds, "swaps_in_window": len(swaps)}  # rank 0's figures are the run's
        return {"window_s": seconds, "window_without_swaps_s": round(s0, 3), "requests_without_swaps": n0,
                "requests_per_s_without_swaps": round(n0 / s0, 3), "forward_steps_without_swaps": f0,
                "requests_with_swaps": n1, "swaps_in_window": len(swaps), "window_with_swaps_s": round(s1, 3),
                "forward_steps_with_swaps": f1,
                "requests_per_s_with_swaps": round(n1 / s1, 3),
                "requests_per_s_ratio": round((n1 / s1) / (n0 / s0), 3) if n0 else None,
                "forward_steps_per_s_without_swaps": round(f0 / s0, 3), "forward_steps_per_s_with_swaps":
                round(f1 / s1, 3), "forward_steps_per_s_ratio": round((f1 / s1) / (f0 / s0), 3) if f0 else None}

    def references(self, phases: PhaseLog, sources: dict[str, tuple]) -> dict[str, dict]:
        """The checked prompt's answer for each weight set, on the idle engine: swapped in, then sglang-jax's
        own flush_cache (its answer must be success: nothing runs), then generated from an empty cache."""
        phases.begin("serve_reference")
        refs = {}
        for weights, (source, plan, alias) in sources.items():
            run_on_engine_loop(self.engine, self.swapper._swap(source, self.cfg.swap_mode, alias, self.cfg.rollback,
                                                               plan))
            flushed = self.engine.flush_cache() if self.leader else None  # rank 0's reaches every scheduler
            if flushed is not None and not flushed.success:
                raise ToolError("serve_reference", f"flush_cache refused on the idle engine: {flushed.error_msg}",
                                "no request should be running once the load has finished", EXIT_ENGINE)
            refs[weights] = generate_greedy(self.engine, self.cfg.prompt, self.cfg.max_new_tokens)
        phases.phase("serve_reference", weights=sorted(refs), output_ids={w: r["output_ids"] for w, r in refs.items()})
        return refs

    def check_requests(self, phases: PhaseLog) -> None:
        """serve_no_lost_requests: every load request returned all its tokens, none errored or was aborted,
        and every swap had requests in flight (else the load proved nothing). Rank 0's, where the clients are."""
        if not self.leader:
            return
        lost = [r for r in self.requests if r.get("error") or r.get("finish") != "length"
                or not r.get("tokens") == r.get("completion_tokens") == r["max_new_tokens"]]
        idle_swaps = [s["swap"] for s in self.swaps if not s.get("requests_paused") and "failed" not in s]
        phases.check("serve_no_lost_requests", bool(self.requests) and not lost and not self.unfinished and not idle_swaps,
                   requests=len(self.requests), lost=len(lost), lost_examples=lost[:5], unfinished=self.unfinished,
                   swaps_with_no_request_in_flight=idle_swaps,
                   requests_paused_per_swap={s["swap"]: s.get("requests_paused") for s in self.swaps})

    def check_forwards(self, phases: PhaseLog, across_ranks: bool = True) -> None:
        """serve_no_mixed_forward: forward steps ran while serving, and none saw a change of weights, on any
        rank. Several hosts (across_ranks): also every rank ran as many steps on each weight set as rank 0;
        a rank's weight ids only grow, so equal counts mean that every step ran on the same set everywhere."""
        g = self.swapper.guard
        mine = {"forwards_while_serving": g.forwards - self.forwards_at_start, **g.forward_counts(),
                "mixed_examples": g.mixed[:5]}
        ranks = HOSTS.agree("serve_forwards", mine) if across_ranks else [mine]
        same = all(r["forwards_by_weights"] == ranks[0]["forwards_by_weights"] for r in ranks)
        ok = same and all(r["forwards_while_serving"] > 0 and not r["forwards_mixed"] for r in ranks)
        phases.check("serve_no_mixed_forward", ok, **mine, **({"ranks": ranks, "ranks_on_the_same_sets": same}
                                                               if HOSTS.multi and across_ranks else {}))

    def check_fresh(self, phases: PhaseLog, refs: dict[str, dict]) -> None:
        """serve_fresh_after_swap: the checked prompt, sent after each swap, answers exactly as its reference
        for that weight set (computed from an empty cache on the idle engine)."""
        rows = []
        for f in self.fresh:
            ids, ref = f["answer"]["output_ids"], refs[f["weights"]]["output_ids"]
            rows.append({"swap": f["swap"], "weights": f["weights"], "equal": ids == ref,
                         "first_difference": next((i for i, (a, b) in enumerate(zip(ids, ref, strict=False)) if a != b),
                                                  None),
                         "cached_tokens": f["answer"]["meta_info"].get("cached_tokens")})
        phases.check("serve_fresh_after_swap", bool(rows) and all(r["equal"] for r in rows), swaps=rows)

    def report(self, phases: PhaseLog, throughput: dict | None) -> None:
        done = [r for r in self.requests if "error" not in r]
        phases.phase("serve_load", clients=self.clients, requests_completed=len(done), **(throughput or {}),
                   swaps=self.swaps, **self.swapper.guard.forward_counts())

    def after_failure(self, phases: PhaseLog, error: ToolError) -> None:
        """A swap failed while serving. Rolled back: generation went on with the previous weights; every
        request in flight must complete on them (forward steps after the failure: that weight set only).
        Each rank checks its own forward steps (the ranks may have failed at different steps)."""
        self.check_forwards(phases, across_ranks=False)
        if not error.details.get("restored") or not self.leader:
            return  # generation stays paused: the requests in flight cannot finish (or: no clients here)
        g, failed = self.swapper.guard, self.swaps[-1]
        in_flight = self.in_flight
        self.finish()
        self.check_requests(phases)
        error.details["serving"] = {
            "requests_in_flight_at_failure": in_flight, "requests_completed": len(self.requests),
            "requests_lost": phases.checks["serve_no_lost_requests"]["lost"] + self.unfinished,
            "forwards_after_failure": g.forwards - failed["forwards_at_failure"],
            "forwards_after_failure_on_previous_weights":
                g.by_weights.get(g.weights_id, 0) - failed["on_previous_at_failure"]}


# ----------------------------------------------------------------------------------------------
# The run's phases on the API: the engine, the answers, the trainer's tree, the plan, the first swap
# ----------------------------------------------------------------------------------------------


def engine_ready_dummy(phases: PhaseLog, cfg: RunConfig, info: CheckpointInfo, device: str,
                       stack: dict) -> tuple[Any, ParamSwapper]:
    """Phase 2: the Engine with load_format="dummy", and the ParamSwapper on it (the Stopper's view of it)."""
    phases.begin("engine_ready_dummy")
    t = time.perf_counter()
    engine, model_runner = start_engine(engine_kwargs(cfg, info.path, device, "dummy"))
    swapper = ParamSwapper(engine, info.num_kv_heads, cfg.bucket_mb, cfg.transpose, cfg.allow_nonfinite)
    if phases.stopper is not None:
        phases.stopper.swapper = swapper
    params = swapper.state.params
    phases.phase("engine_ready_dummy", seconds=round(time.perf_counter() - t, 3), model_path=info.path,
               load_format="dummy", num_leaves=len(leaves_of(model_runner)), num_params=len(params),
               param_bytes_sum=param_bytes_sum(p.get_value() for p in params.values()),
               sglang_jax_version=stack["sglang-jax"], flax_version=stack["flax"], stack=stack["stack"])
    return engine, swapper


def answer(engine, cfg: RunConfig, load: ServeLoad | None, logprobs: bool = False) -> dict:
    """The checked prompt's greedy answer (alone, with --serve-load: the load held, its requests finished)."""
    if load is not None:
        return load.generate_alone(cfg.prompt, cfg.max_new_tokens, logprobs)
    return generate_greedy(engine, cfg.prompt, cfg.max_new_tokens, logprobs)


def generate_result(phases: PhaseLog, cfg: RunConfig, engine, load: ServeLoad | None = None,
                    phase: str = "generate_result", logprobs: bool = False) -> dict:
    """generate_before_swap (the dummy engine's answer) and generate_result (the swapped engine's)."""
    phases.begin(phase)
    t = time.perf_counter()
    out = answer(engine, cfg, load, logprobs)
    fields = {k: v for k, v in out.items() if k not in ("prompt_ids", "output_logprobs")}
    phases.phase(phase, seconds=round(time.perf_counter() - t, 3), prompt=cfg.prompt, **fields)
    phases.answers.append((phase, out))
    return out


def trainer_sharding(item: SwapItem, shape: tuple, how: str):
    """Where --weights-source trainer puts a source tensor. fsdp: first axis split over all devices where it
    divides, else replicated; replicated; engine: exactly the target's sharding where the shapes match
    (the source_sharding otherwise: a KV projection before its heads are repeated, an lm_head kernel)."""
    import jax

    if how == "engine":
        return source_sharding(item, shape)
    devices = item.sharding.mesh.devices.reshape(-1)
    mesh = jax.sharding.Mesh(devices, ("fsdp",))
    split = how == "fsdp" and len(shape) > 0 and shape[0] % len(devices) == 0
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp" if split else None))


def mllm_params_device_ready(phases: PhaseLog, cfg: RunConfig, swapper: ParamSwapper, tree: Mapping[str, Any]) -> dict:
    """--weights-source trainer: put the host tree on the devices as a trainer holds it (--trainer-sharding;
    engine: also in the engine's dtype), so that the swap runs device to device. Returns the nested tree."""
    phases.begin("mllm_params_device_ready")
    t = time.perf_counter()
    flat = flatten(tree)
    on_device, aliasable = {}, 0
    for item in swapper.plan(flat):
        src = flat[item.source]
        dtype = item.dtype if cfg.trainer_sharding == "engine" else src.dtype
        arr = put(src.astype(dtype, copy=False), trainer_sharding(item, src.shape, cfg.trainer_sharding))
        on_device[item.source] = arr.block_until_ready()
        aliasable += item.nbytes_sum if can_alias(item, arr) else 0
    split = memory_split(swapper.state, swapper.guard, on_device)
    phases.phase("mllm_params_device_ready", trainer_sharding=cfg.trainer_sharding,
               dtypes=sorted({str(a.dtype) for a in on_device.values()}), num_tensors=len(on_device),
               trainer_bytes_sum=split["trainer_bytes_sum"], aliasable_bytes_sum=aliasable,
               seconds=round(time.perf_counter() - t, 4))
    return nest(on_device)


def sglang_param_dict_ready(phases: PhaseLog, cfg: RunConfig, swapper: ParamSwapper, tree: Mapping[str, Any]):
    """Validate the whole plan against the engine before anything touches it (placement happens in the swap,
    in both modes: streaming a bucket at a time, bulk all of them first)."""
    phases.begin("sglang_param_dict_ready")
    t = time.perf_counter()
    plan = swapper.plan(tree)
    phases.phase("sglang_param_dict_ready", swap_mode=cfg.swap_mode, num_arrays=len(plan),
               bucket_mb=None if cfg.swap_mode == "bulk" else cfg.bucket_mb, transpose=swapper.transpose,
               param_bytes_sum=sum(i.nbytes_sum for i in plan), seconds=round(time.perf_counter() - t, 4))
    return plan


def swap_in(cfg: RunConfig, swapper: ParamSwapper, load: ServeLoad | None, tree, plan, alias: bool, label: str,
            weights: str, trainer_held: Mapping[str, Any] | None = None) -> SwapResult:
    """One swap through the API's path (pause, change, flush, continue), under the load when there is one."""
    if load is not None:
        return run_on_engine_loop(swapper.engine, load.swap_under_load(tree, plan, alias, label, weights,
                                                                       trainer_held=trainer_held))
    return run_on_engine_loop(swapper.engine, swapper._swap(tree, cfg.swap_mode, alias, cfg.rollback, plan,
                                                            trainer_held))


def weights_swapped_from_mllm(phases: PhaseLog, cfg: RunConfig, swapper: ParamSwapper, load: ServeLoad | None,
                              tree: Mapping[str, Any], plan) -> dict:
    """The first swap (A). Returns {nnx path: the engine's new array}."""
    phases.begin("weights_swapped_from_mllm")
    result = swap_in(cfg, swapper, load, tree, plan, cfg.alias, "first swap", "A")
    phases.check("leaves_unchanged", result.report["leaves_unchanged"], **result.leaves)
    phases.phase("weights_swapped_from_mllm", **result.report)
    return result.arrays


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------


def buffer_pointers(arr) -> list[tuple[int, int]]:
    return [(device.id, ptr) for device, ptr, _ in device_buffers(arr)]


def param_sharing_check(phases: PhaseLog, state: EngineState, param_dict: Mapping[str, Any]) -> bool:
    """For EVERY path: the engine's Param value and its model_state_leaves entry are the dict's very
    jax.Array (identity), and every addressable shard sits on the same device buffer."""
    leaves = state.leaves()
    not_identical, not_same_buffer, shards = [], [], 0
    for path, arr in param_dict.items():
        param_value, leaf = state.params[path].get_value(), leaves[state.leaf_index[path]]
        if param_value is not arr or leaf is not arr:
            not_identical.append(path)
        want = buffer_pointers(arr)
        shards += len(want)
        if buffer_pointers(param_value) != want or buffer_pointers(leaf) != want:
            not_same_buffer.append(path)
    ok = phases.check("param_sharing", bool(param_dict) and not not_identical and not not_same_buffer,
                    paths_checked=len(param_dict), shards_checked=shards, not_identical=not_identical[:10],
                    not_same_buffer=not_same_buffer[:10])
    phases.phase("param_sharing_check", ok=ok, paths_checked=len(param_dict), shards_checked=shards,
               not_identical=len(not_identical), not_same_buffer=len(not_same_buffer))
    return ok


# ----------------------------------------------------------------------------------------------
# Independent oracles: sglang-jax's own loader (--verify-weights), a transformers forward (--verify-logits)
# ----------------------------------------------------------------------------------------------


@functools.cache
def bits_diff():
    """jitted (a, b) -> (differing elements, first differing flat index, max |a - b|), on the devices.
    Compares the bits (NaN == NaN of the same bits, -0 != +0); no reshape, so explicit shardings hold."""
    import jax
    import jax.numpy as jnp

    def diff(a, b):
        uint = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[a.dtype.itemsize]
        neq = jax.lax.bitcast_convert_type(a, uint) != jax.lax.bitcast_convert_type(b, uint)
        flat = sum(jax.lax.broadcasted_iota(jnp.int32, a.shape, d) * int(np.prod(a.shape[d + 1:], dtype=np.int64))
                   for d in range(a.ndim)) if a.ndim else jnp.int32(0)
        first = jnp.min(jnp.where(neq, flat, jnp.iinfo(jnp.int32).max))
        abs_diff = jnp.where(neq, jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)), 0.0)
        return jnp.sum(neq, dtype=jnp.int32), first, jnp.max(abs_diff)

    return jax.jit(diff)


def compare_arrays(ours, theirs) -> dict | None:
    """None when `ours` (the engine's Param) equals `theirs` (the loader's) in shape, dtype, sharding and
    every bit; else what differs: max abs diff and the first differing index."""
    import jax

    problems = {}
    if tuple(ours.shape) != tuple(theirs.shape):
        return {"shape": [list(ours.shape), list(theirs.shape)]}
    if ours.dtype != theirs.dtype:
        problems["dtype"] = [str(ours.dtype), str(theirs.dtype)]
        theirs = theirs.astype(ours.dtype)
    if not ours.sharding.is_equivalent_to(theirs.sharding, ours.ndim):
        problems["sharding"] = [str(ours.sharding.spec), str(getattr(theirs.sharding, "spec", theirs.sharding))]
        theirs = jax.device_put(theirs, ours.sharding)
    count, first, max_abs = (v.item() for v in bits_diff()(ours, theirs))
    if count:
        problems.update(differing_elements=int(count), max_abs_diff=float(max_abs),
                        first_differing_index=[int(i) for i in np.unravel_index(int(first), ours.shape)])
    return problems or None


def hold_for_collectives(load: ServeLoad | None) -> None:
    """Several hosts: sglang-jax's own loader (the weights oracle) runs device collectives across the hosts from
    this thread, and none may interleave with a forward's collectives on the scheduler's thread (seen on
    0.1.0rc0 under --serve-load: gloo's "collective mismatch" abort, or both ranks hung). The load is held,
    its requests in flight finished, until the next answer lets it go (ServeLoad.generate_alone)."""
    if load is not None and HOSTS.multi:
        load.hold()


def weights_equal_loader(phases: PhaseLog, state: EngineState, model_path: str, swap: str = "first swap") -> bool:
    """Every engine Param against what sglang-jax's OWN loader (its model file's weight mappings, its
    WeightLoader) makes of the checkpoint at `model_path`, in this process and on these devices: values
    bit for bit, shape, dtype, sharding. The loader runs tensor by tensor through LoaderTap, so the extra
    device memory is one loaded tensor, not a second set. Exact while the engine serves: the meter skips a KV
    buffer a forward donates mid-walk, and nothing raised here reaches the loader (which would take it for its
    own failure and load that tensor again: run_own_loader); a failure of the oracle itself is exit 3."""
    phases.begin("weights_verified")
    t = time.perf_counter()
    base_rss, base = process_rss_bytes(), bytes_in_use_sum(device_memory())
    peak, peak_rss = base, base_rss
    differing: dict[str, dict] = {}
    loaded: dict[str, int] = {}
    failed: list[str] = []  # the oracle's own errors, raised after the loader is done
    lock = threading.Lock()

    def on_assign(path: str, array) -> None:
        nonlocal peak, peak_rss
        with lock:
            loaded[path] = loaded.get(path, 0) + 1
            try:
                if path in state.params:
                    problems = compare_arrays(state.params[path].get_value(), array)
                    if problems:
                        differing[path] = problems
                peak = max(peak, bytes_in_use_sum(device_memory(collect=False)))
                peak_rss = max(peak_rss, process_rss_bytes())
            except Exception as e:  # noqa: BLE001 - never into the loader (run_own_loader); raised below
                failed.append(f"{path}: {type(e).__name__}: {e}")

    try:
        run_own_loader(state.model_runner, model_path, on_assign)
    except Exception as e:  # noqa: BLE001 - sglang-jax's loader failing on the checkpoint is the oracle failing
        raise ToolError("weights_verified", f"sglang-jax's own loader failed on {model_path}: {type(e).__name__}: "
                        f"{e}", "see the traceback on stderr; the swap itself is done", EXIT_ENGINE) from e
    if failed:
        raise ToolError("weights_verified", f"the weights oracle failed while comparing {failed[0]}"
                        + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""),
                        "the oracle itself failed, not a check: see stderr", EXIT_ENGINE, oracle_errors=failed[:10])
    not_loaded = sorted(set(state.params) - set(loaded))
    unknown = sorted(set(loaded) - set(state.params))
    twice = sorted(p for p, n in loaded.items() if n > 1)
    param_bytes = param_bytes_sum(p.get_value() for p in state.params.values())
    ok = not differing and not not_loaded and not unknown and not twice
    details = {"paths_checked": len(state.params), "differing": dict(list(differing.items())[:20]),
               "num_differing": len(differing), "not_loaded_by_loader": not_loaded[:20],
               "loaded_but_not_in_engine": unknown[:20], "loaded_twice": twice[:20]}
    earlier = phases.checks.get("weights_equal_loader")  # with --rounds: every verified swap must pass
    failed_swaps = (earlier["failed_swaps"] if earlier else []) + ([] if ok else [swap])
    shown = details
    if earlier and not earlier["ok"]:  # the first failure's details stay
        shown = {k: v for k, v in earlier.items() if k not in ("ok", "swaps_checked", "failed_swaps")}
    phases.check("weights_equal_loader", not failed_swaps, **shown, failed_swaps=failed_swaps,
               swaps_checked=(earlier["swaps_checked"] if earlier else 0) + 1)
    phases.phase("weights_verified", ok=ok, swap=swap, **details, seconds=round(time.perf_counter() - t, 3), model_path=model_path,
               peak_extra_bytes_sum=peak - base, peak_extra_ratio=round((peak - base) / param_bytes, 4),
               rss_extra_peak_bytes=peak_rss - base_rss)
    return ok




def reference_token_logprobs(model_path: str, prompt_ids: list[int], output_ids: list[int]) -> dict:
    """transformers' own model of the checkpoint, float32 on the host CPU, teacher-forced on the prompt and
    the engine's tokens: per generated token its log-probability, the argmax and the argmax's log-probability.
    Shares no code with the tool's mapping or with sglang-jax."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32, low_cpu_mem_usage=True)
    model.eval()
    ids = torch.tensor([prompt_ids + output_ids], dtype=torch.long)
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1:-1].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    tokens = torch.tensor(output_ids)
    best, argmax = logprobs.max(dim=-1)
    return {"logprobs": logprobs[torch.arange(len(output_ids)), tokens].tolist(), "argmax": argmax.tolist(),
            "argmax_logprobs": best.tolist()}


def logits_match_reference(phases: PhaseLog, cfg, model_path: str, answer: dict) -> bool:
    """The engine's logprob of each generated token against an independent float32 forward of the same
    checkpoint, and each token against the reference's argmax (within a margin, for near ties)."""
    if not answer["consistent"]:
        return phases.check("logits_match_reference", False, error="the engine's answer is inconsistent: "
                          + "; ".join(answer["consistency_problems"]))
    phases.begin("logits_verified")
    t = time.perf_counter()
    ref = reference_token_logprobs(model_path, answer["prompt_ids"], answer["output_ids"])
    tol, margin_tol = LOGITS_TOLERANCE.get(cfg.dtype, LOGITS_TOLERANCE["bfloat16"])
    tol = cfg.logprob_tolerance if cfg.logprob_tolerance is not None else tol
    margin_tol = cfg.argmax_margin if cfg.argmax_margin is not None else margin_tol
    engine_lp = answer["output_logprobs"]
    diffs = [abs(e - r) for e, r in zip(engine_lp, ref["logprobs"], strict=True)]
    margins = [b - r for b, r in zip(ref["argmax_logprobs"], ref["logprobs"], strict=True)]
    agree = sum(a == o for a, o in zip(ref["argmax"], answer["output_ids"], strict=True))
    worst = sorted(range(len(diffs)), key=lambda i: -max(diffs[i] / tol, margins[i] / margin_tol))[:5]
    ok = max(diffs) <= tol and max(margins) <= margin_tol
    details = {"engine_dtype": cfg.dtype, "num_tokens": len(diffs), "logprob_tolerance": tol,
               "argmax_margin": margin_tol, "max_abs_logprob_diff": round(max(diffs), 6),
               "mean_abs_logprob_diff": round(sum(diffs) / len(diffs), 6), "max_margin": round(max(margins), 6),
               "argmax_agreement": f"{agree}/{len(diffs)}",
               "worst_tokens": [{"position": i, "token": answer["output_ids"][i], "engine_logprob": round(engine_lp[i], 6),
                                 "reference_logprob": round(ref["logprobs"][i], 6), "reference_argmax": ref["argmax"][i],
                                 "margin": round(margins[i], 6)} for i in worst]}
    phases.check("logits_match_reference", ok, **details)
    phases.phase("logits_verified", sample_memory=not HOSTS.multi, ok=ok, **details, seconds=round(time.perf_counter() - t, 3),
               engine_logprobs=[round(v, 6) for v in engine_lp], reference_logprobs=[round(v, 6) for v in ref["logprobs"]],
               reference_argmax=ref["argmax"])
    return ok


# ----------------------------------------------------------------------------------------------
# --rounds: swap back and forth between A and B; answers must repeat and memory must not grow
# ----------------------------------------------------------------------------------------------


class PerturbedWeights(Mapping):
    """Weight set B for --rounds: every matrix w of A as 0.02 - w, made one tensor at a time as the swap reads
    it. Deterministic, same shapes, clearly different answers, no second copy of the weights; elementwise, so
    a trainer-resident A in any sharding gives B on the devices in the same sharding. (Plain negation would
    not do: negating every matrix of a Qwen2 is an exact symmetry, RMSNorm and the q.k / gate.up products
    cancel the signs, and the answers stay the same.)"""

    def __init__(self, base: Mapping[str, np.ndarray]):
        self.base = base

    def __getitem__(self, key: str) -> np.ndarray:
        arr = self.base[key]
        return 0.02 - arr if arr.ndim >= 2 else arr

    def __iter__(self):
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def made_before_swap(source: Mapping[str, Any]) -> tuple[Mapping[str, Any], float]:
    """A lazy B of a device A, computed on the devices now (seconds returned): a trainer has its new weights
    before it swaps, so a round's swap times the swap alone. A host A's B stays lazy (no second host copy;
    its host work is in the swap's put_s); any other source is returned as it is."""
    import jax

    if not isinstance(source, PerturbedWeights) or not all(on_devices(a) for a in source_arrays(source)):
        return source, 0.0
    t = time.perf_counter()
    made = {k: source[k] for k in source}
    jax.block_until_ready(list(made.values()))
    return made, time.perf_counter() - t


def weights_b(cfg, swapper: ParamSwapper, flat_a):
    """B's tree, its plan, and its checkpoint folder (None for the perturbed copy of A)."""
    if not cfg.model_id_b:
        return PerturbedWeights(flat_a), swapper.plan(flat_a), None
    info_b = read_checkpoint_info(resolve_checkpoint(cfg.model_id_b, cfg.download_dir))
    flat_b = flatten(read_mllm_tree(cfg, info_b)[0])
    return flat_b, swapper.plan(flat_b), info_b.path


def alias_for(cfg: RunConfig, source) -> bool:
    """--alias where the source is on the devices (a perturbed B of a trainer tree is too)."""
    return cfg.alias and all(on_devices(a) for a in source_arrays(source))


def swap_rounds(phases: PhaseLog, cfg: RunConfig, swapper: ParamSwapper, load: ServeLoad | None, info: CheckpointInfo,
                flat_a, plan_a, first_output: dict) -> tuple:
    """--rounds: swap B, A, B, ... (each under the load with --serve-load); returns B's (tree, plan)."""
    engine = swapper.engine
    flat_b, plan_b, path_b = weights_b(cfg, swapper, flat_a)  # validated before round 1 touches anything
    first = next(r for r in phases.records if r["phase"] == "weights_swapped_from_mllm")
    limit = int(first["engine_bytes_sum"] * cfg.single_copy_tolerance)  # the engine's part (a trainer holds A)
    outputs: dict[str, list] = {"A": [], "B": []}
    leaks, last_output = [], first_output
    for r in range(1, cfg.rounds + 1):
        phases.begin(f"swap_round {r}")
        which = "B" if r % 2 else "A"
        lazy, plan = (flat_b, plan_b) if which == "B" else (flat_a, plan_a)
        source, made_s = made_before_swap(lazy)
        trainer_held = flat_a if source is not lazy else None  # a B made on the devices: A is still there
        try:
            report = swap_in(cfg, swapper, load, source, plan, alias_for(cfg, source), f"round {r}", which,
                             trainer_held).report
        except ToolError as e:
            if load is not None:
                load.after_failure(phases, e)
            check_restored(e, engine, cfg, last_output)
            raise
        checkpoint = info.path if which == "A" else path_b
        if cfg.verify_weights and checkpoint:  # a perturbed B has no checkpoint to load
            hold_for_collectives(load)
            weights_equal_loader(phases, swapper.state, checkpoint, swap=f"round {r}")
        out = answer(engine, cfg, load)
        outputs[which].append(out["output_ids"])
        phases.answers.append((f"swap_round {r}", out))
        last_output = out
        if report["engine_bytes_sum"] > limit or not report["leaves_unchanged"]:
            leaks.append({"round": r, "engine_bytes_sum": report["engine_bytes_sum"],
                          "leaves_ok": report["leaves_unchanged"]})
        phases.phase("swap_round", round=r, weights=which, weights_made_s=round(made_s, 4), **report,
                   output_ids=out["output_ids"], text=out["text"], finish_reason=out["finish_reason"])
    first_a = first_output["output_ids"]
    b_runs = outputs["B"]
    phases.check("rounds_consistent",
               all(o == first_a for o in outputs["A"]) and all(o == b_runs[0] for o in b_runs) and b_runs[0] != first_a,
               rounds=cfg.rounds, a_output_ids=first_a, b_output_ids=b_runs[0],
               a_rounds_equal=sum(o == first_a for o in outputs["A"]), a_rounds=len(outputs["A"]),
               b_rounds_equal=sum(o == b_runs[0] for o in b_runs), b_rounds=len(b_runs))
    phases.check("rounds_no_leak", not leaks, limit=limit, failed_rounds=leaks)
    check_generate(phases)
    return flat_b, plan_b


def serve_results(phases: PhaseLog, cfg: RunConfig, load: ServeLoad, flat_a, plan_a, flat_b, plan_b) -> None:
    """--serve-load: throughput without and with swaps (B then A, while serving), then the load stops; the
    references (each weight set on the idle engine, sglang-jax's own flush); the three serve checks."""
    phases.begin("serve_load")
    lazy_b, plan_b = (flat_b, plan_b) if flat_b is not None else (PerturbedWeights(flat_a), plan_a)
    b = (made_before_swap(lazy_b)[0], plan_b)  # a device A's B is on the devices before the window starts
    swaps = [(b[0], b[1], alias_for(cfg, b[0]), "B"), (flat_a, plan_a, alias_for(cfg, flat_a), "A")]
    throughput = load.throughput(cfg.serve_seconds, swaps)
    load.finish()
    sources = {"A": (flat_a, plan_a, alias_for(cfg, flat_a))}
    if any(f["weights"] == "B" for f in load.fresh):
        sources["B"] = (b[0], b[1], alias_for(cfg, b[0]))
    refs = load.references(phases, sources)
    load.check_requests(phases)
    load.check_forwards(phases)
    load.check_fresh(phases, refs)
    load.report(phases, throughput)


# ----------------------------------------------------------------------------------------------
# The demo checkpoint: a tiny random model of one family, with a tokenizer trained on the spot
# ----------------------------------------------------------------------------------------------

DEMO_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Explain what a parameter hot-swap is in one sentence.",
    "Reinforcement learning trainers update weights; rollout engines generate with them.",
    "JAX arrays are sharded over devices; every device holds a shard or a replica.",
]


# Qwen's ChatML, for --chat on the demo checkpoint (its tokenizer knows no special tokens but EOS: plain text)
DEMO_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                      "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tokenizer(folder: str, vocab_size: int, chat_template: bool = True) -> int:
    """A byte-level BPE trained on the spot; returns the EOS id. EOS is the LAST id, not 0 (the tool
    generates with ignore_eos, so an early EOS would not shorten an answer, but the demo reads better)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(DEMO_CORPUS * 20, trainer)
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>", "model_max_length": 4096,
                   **({"chat_template": DEMO_CHAT_TEMPLATE} if chat_template else {})}, f)
    return tok.token_to_id("<|endoftext|>")


def write_demo_checkpoint(folder: str, *, tied: bool = True, num_kv_heads: int = 2, num_heads: int = 4,
                          head_dim: int = 128, hidden_size: int = 512, intermediate_size: int = 1024,
                          num_layers: int = 2, vocab_size: int = 512, dtype: str = "bfloat16",
                          num_shards: int = 1, seed: int = 0, chat_template: bool = True, arch: str = "qwen2",
                          attention_bias: bool = False) -> str:
    """A random-weight checkpoint of the family `arch` (FAMILIES: qwen2, qwen3, llama, qwen3_moe) in HF layout (config,
    tokenizer, safetensors). head_dim 128: the CPU attention path needs it. Llama gets llama3 rope scaling.
    Returns the folder."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    eos = write_tokenizer(folder, vocab_size, chat_template)
    family = next(f for f in FAMILIES.values() if f.arch == arch)
    config = {
        "architectures": [family.architecture], "model_type": family.model_type, "vocab_size": vocab_size,
        "hidden_size": hidden_size, "intermediate_size": intermediate_size, "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads, "head_dim": head_dim,
        "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "tie_word_embeddings": tied, "torch_dtype": dtype, "bos_token_id": eos, "eos_token_id": eos,
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": num_layers,
    }
    if family.biases == "attention_bias":
        config["attention_bias"] = attention_bias
    if family.demo_config:
        config.update(family.demo_config(config))
    biases = ("q", "k", "v") if family.biases == "qkv" else ("q", "k", "v", "o") if attention_bias else ()
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    rng = np.random.default_rng(seed)
    out_dtype = host_dtype(dtype)

    def rand(*shape, std=0.05, mean=0.0):
        return (mean + std * rng.standard_normal(shape, dtype=np.float32)).astype(out_dtype)

    q, kv = num_heads * head_dim, num_kv_heads * head_dim
    tensors = {"model.embed_tokens.weight": rand(vocab_size, hidden_size, std=0.05),
               "model.norm.weight": rand(hidden_size, mean=1.0)}
    if not tied:
        tensors["lm_head.weight"] = rand(vocab_size, hidden_size)
    for i in range(num_layers):
        p = f"model.layers.{i}."
        tensors.update({p + "input_layernorm.weight": rand(hidden_size, mean=1.0),
                        p + "post_attention_layernorm.weight": rand(hidden_size, mean=1.0)})
        for b, (out, inp) in {"q": (q, hidden_size), "k": (kv, hidden_size), "v": (kv, hidden_size),
                              "o": (hidden_size, q)}.items():
            tensors[p + f"self_attn.{b}_proj.weight"] = rand(out, inp)
            if b in biases:
                tensors[p + f"self_attn.{b}_proj.bias"] = rand(out)
        if family.moe and i not in config["mlp_only_layers"]:
            moe = config["moe_intermediate_size"]
            tensors[p + "mlp.gate.weight"] = rand(config["num_experts"], hidden_size, std=0.5)
            for e in range(config["num_experts"]):
                tensors.update({p + f"mlp.experts.{e}.gate_proj.weight": rand(moe, hidden_size),
                                p + f"mlp.experts.{e}.up_proj.weight": rand(moe, hidden_size),
                                p + f"mlp.experts.{e}.down_proj.weight": rand(hidden_size, moe)})
        else:
            tensors.update({p + "mlp.gate_proj.weight": rand(intermediate_size, hidden_size),
                            p + "mlp.up_proj.weight": rand(intermediate_size, hidden_size),
                            p + "mlp.down_proj.weight": rand(hidden_size, intermediate_size)})
        if family.qk_norm:
            tensors.update({p + "self_attn.q_norm.weight": rand(head_dim, mean=1.0),
                            p + "self_attn.k_norm.weight": rand(head_dim, mean=1.0)})
    names = list(tensors)
    if num_shards == 1:
        save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return folder
    weight_map = {}
    for s in range(num_shards):
        fname = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::num_shards]}
        save_file(part, os.path.join(folder, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}, f)
    return folder


# ----------------------------------------------------------------------------------------------
# Reports for people: the stderr table, --plot, --wandb
# ----------------------------------------------------------------------------------------------


def memory_rows(records: list[dict]) -> list[tuple[str, float, int, int]]:
    """(phase, elapsed_s, bytes_in_use_sum, process_rss_bytes) of every phase that measured memory."""
    return [(r["phase"] + (f" {r['round']}" if "round" in r else ""), r["elapsed_s"], bytes_in_use_sum(r["memory"]),
             r["memory"]["process_rss_bytes"]) for r in records if "memory" in r]


def memory_table(records: list[dict]) -> str:
    rows = memory_rows(records)
    base = next((b for p, _, b, _ in rows if p == "engine_ready_dummy"), None)
    lines = [f"{'phase':34} {'elapsed_s':>9} {'device bytes in use (sum)':>26} {'vs dummy':>9} {'host RSS':>10}"]
    for phase, elapsed, in_use, rss in rows:
        ratio = f"{in_use / base:8.3f}x" if base else ""
        lines.append(f"{phase:34} {elapsed:9.1f} {in_use:26,} {ratio:>9} {rss / 2**30:8.2f} GiB")
    return "\n".join(lines)


def plot_memory(records: list[dict], path: str) -> None:
    """Bars of bytes_in_use_sum per phase; dashed lines at the dummy engine (one set of params) and at one
    set more (what a second copy would cost); a tick at each swap's sampled peak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = memory_rows(records)
    base = next(b for p, _, b, _ in rows if p == "engine_ready_dummy")
    params = next(r["param_bytes_sum"] for r in records if r["phase"] == "engine_ready_dummy")
    unit, unit_name = (2**30, "GiB") if base + params >= 2**30 else (2**20, "MiB")
    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=80)
    colors = ["tab:red" if b > base * 1.02 else "tab:blue" for _, _, b, _ in rows]
    ax.bar(range(len(rows)), [b / unit for _, _, b, _ in rows], color=colors)
    peaks = [(i, r["swap_peak_bytes_in_use_sum"]) for i, r in enumerate(r for r in records if "memory" in r)
             if "swap_peak_bytes_in_use_sum" in r]
    if peaks:
        ax.scatter([i for i, _ in peaks], [p / unit for _, p in peaks], marker="_", s=900, color="tab:orange",
                   zorder=3, label="peak during the swap")
    ax.axhline(base / unit, color="black", linestyle="--", linewidth=1, label="one set of params (dummy engine)")
    ax.axhline((base + params) / unit, color="tab:red", linestyle=":", linewidth=1, label="+ a second set")
    ax.set_ylim(0, (base + params) / unit * 1.35)
    ax.set_xticks(range(len(rows)), [p for p, _, _, _ in rows], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(f"device bytes in use, sum ({unit_name})")
    ax.set_title("run_param_swap: device memory per phase", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", ncol=3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


class WandbSink:
    """Logs each phase's memory and timings to W&B from process 0. Any W&B failure becomes a warning on
    stderr and turns the sink off: it must never break the run."""

    def __init__(self, cfg):
        self.run, self.step = None, 0
        try:
            import jax
            import wandb

            if jax.process_index() != 0:
                return
            self.run = wandb.init(project=cfg.wandb_project, config={k: v for k, v in vars(cfg).items()},
                                  job_type="param-swap")
        except Exception as e:  # noqa: BLE001 - W&B is optional: warn and go on
            log(f"warning: W&B disabled: {type(e).__name__}: {e}")

    def log(self, record: dict) -> None:
        if self.run is None:
            return
        metrics = {f"{record['phase']}/{k}": v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if "memory" in record:
            summary = record["memory"]["jax_device_memory_summary"]
            metrics.update({f"memory/{k}": v for k, v in summary.items()})
            metrics["memory/process_rss_bytes"] = record["memory"]["process_rss_bytes"]
        if record["phase"] == "summary":
            metrics["summary/ok"] = int(record["ok"])
            metrics.update({f"checks/{k}": int(v["ok"]) for k, v in record["checks"].items()})
        try:
            self.run.log(metrics, step=self.step)
            self.step += 1
            if record["phase"] == "summary":
                self.run.finish()
                self.run = None
        except Exception as e:  # noqa: BLE001 - W&B is optional: warn and go on
            log(f"warning: W&B logging failed, disabled: {type(e).__name__}: {e}")
            self.run = None


def report(phases: PhaseLog, cfg) -> None:
    """The stderr table, and the plot if asked for. Runs after the summary, on every path."""
    if any("memory" in r for r in phases.records):
        print("\n" + memory_table(phases.records), file=sys.stderr, flush=True)
    if cfg.plot and any(r["phase"] == "engine_ready_dummy" for r in phases.records):
        try:
            plot_memory(phases.records, cfg.plot)
            log(f"memory plot: {cfg.plot}")
        except Exception as e:  # noqa: BLE001 - a plot must not change the verdict
            log(f"warning: --plot failed: {type(e).__name__}: {e}")


# ----------------------------------------------------------------------------------------------
# The verdict: the single-copy check, the summary, how every run ends
# ----------------------------------------------------------------------------------------------


def check_single_copy(phases: PhaseLog, tolerance: float, phase_names: list[str]) -> bool:
    """The engine never holds two sets: device bytes in use, less what only a trainer holds (its arrays the
    engine does not share: trainer_only_bytes_sum, 0 without a trainer) and less the buffers the batch of a
    paused scheduler still holds (serving_bytes_sum: its last forward's inputs, 0 on an engine that never
    served), stay within the dummy engine's x tolerance. Both are counted, never estimated: a second copy of
    any weight is neither."""
    base = phases.memory_of("engine_ready_dummy")
    records = {r["phase"]: r for r in phases.records if r["phase"] in phase_names and "memory" in r}
    seen = {p: bytes_in_use_sum(records[p]["memory"]) - records[p].get("trainer_only_bytes_sum", 0)
            - records[p].get("serving_bytes_sum", 0) for p in phase_names if p in records}
    limit = int(base * tolerance) if base else None
    ok = bool(base) and bool(seen) and all(v <= limit for v in seen.values())
    return phases.check("single_copy_memory", ok, engine_ready_dummy=base, limit=limit, tolerance=tolerance, **seen,
                      counted_apart={p: {k: records[p].get(k, 0) for k in ("trainer_only_bytes_sum", "serving_bytes_sum")}
                                     for p in seen})


def summary(phases: PhaseLog, error: ToolError | None = None) -> int:
    """The verdict and the exit code. Several hosts: the same on every rank (Hosts.end), with each rank's."""
    if error is not None:
        HOSTS.fail(error)
    ok = error is None and bool(phases.checks) and all(c["ok"] for c in phases.checks.values())
    code = error.exit_code if error is not None else EXIT_OK if ok else EXIT_CHECK_FAILED
    code, hosts = HOSTS.end(code, [name for name, c in phases.checks.items() if not c["ok"]])
    for h in hosts:  # several hosts: a check that failed on another rank fails this one's verdict too
        if h["rank"] != HOSTS.rank and h["failed_checks"]:
            log(f"rank {h['rank']}: check(s) failed there: {', '.join(h['failed_checks'])}")
    phases.phase("summary", sample_memory=False, ok=code == EXIT_OK, checks=phases.checks,
               **({"exit_code": code, "hosts": hosts} if HOSTS.multi else {}))
    return code


def finish(phases: PhaseLog, cfg: RunConfig, error: ToolError | None = None) -> int:
    """How every run ends, whatever ends it (main, a failure, the Stopper): the error line if any, the summary
    with the exit code, then the stderr table and the plot. Nothing is written after it (a stop that comes
    later finds the verdict written)."""
    with phases.lock:
        if error is not None:
            phases.write(error.record())
        code = summary(phases, error)
        phases.closed = True
    report(phases, cfg)
    return code


# ----------------------------------------------------------------------------------------------
# Stopping: Ctrl-C (SIGINT) and SIGTERM (`timeout`, schedulers) end the run with its verdict
# ----------------------------------------------------------------------------------------------

STOP_SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143}  # the shell's 128 + signal number
# sglang-jax's scheduler answers its own failure (an exception, a watchdog timeout) with SIGQUIT, and its
# handler SIGKILLs the whole process tree: exit 137, no message. The Stopper takes SIGQUIT too: exit 3.
WATCHED_SIGNALS = {*STOP_SIGNALS, signal.SIGQUIT}
SWAP_FINISH_WAIT_S = 120.0  # how long a stop waits for a swap in progress to complete or roll back


class Stopper:
    """SIGINT and SIGTERM are blocked in every thread (install() runs before JAX or the engine start a
    thread, and threads inherit the mask) and taken by one watcher thread with sigwait, with SIGQUIT (the
    engine's own failure signal: error line, exit 3, whenever it comes, also inside Engine()). So a stop is seen
    within moments whatever the main thread is doing (an XLA compile, a generation, a swap), and neither
    Python's KeyboardInterrupt nor sglang-jax's handlers run half-way through something. The watcher lets a
    swap in progress complete (or roll back) first, at most SWAP_FINISH_WAIT_S, then writes one error line
    (stage `interrupted`: the signal, the phase it interrupted, what the engine holds), the summary and the
    stderr table, kills the engine's child processes and exits 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, phases: PhaseLog, cfg):
        self.phases, self.cfg = phases, cfg
        self.swapper: ParamSwapper | None = None  # set once the engine runs
        self.cleanup: list = []  # callables run before exiting (the demo's temp folder)
        self.stopping = threading.Lock()  # held by the one stop() that ends the process

    def install(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED_SIGNALS)
        threading.Thread(target=self.watch, name="param-swap-stopper", daemon=True).start()

    def engine_holds(self, waited: float | None) -> str:
        sw = self.swapper
        if sw is None:
            return "no engine was running" if self.phases.doing != "engine_ready_dummy" else "the engine was starting"
        if not sw.idle.is_set():
            return f"a swap was still running after {waited:.0f} s: the engine is half-swapped"
        if sw.last_swap_restored is not None:
            return ("the previous weights (a failed swap was rolled back)" if sw.last_swap_restored
                    else "half-swapped weights (a failed swap without rollback)")
        swapped = f"the weights of swap {sw.swaps}" if sw.swaps else "the dummy weights (no swap yet)"
        return swapped + (f"; the swap in progress completed before stopping ({waited:.1f} s)" if waited else "")

    def watch(self) -> None:
        signum = signal.sigwait(WATCHED_SIGNALS)
        name, doing = signal.Signals(signum).name, self.phases.doing
        log(f"{name}: stopping (during {doing})")
        if signum == signal.SIGQUIT:
            lost = HOSTS.lost_since(time.monotonic())  # several hosts: a forward fails when another rank dies
            if lost is not None:
                lost.details.update(engine_error=ENGINE_ERRORS.text() or None, interrupted_phase=doing)
            self.stop(lost or ToolError(
                "engine_start" if doing == "engine_ready_dummy" else "engine_crash",
                "the sglang-jax scheduler failed (SIGQUIT: a scheduler exception or a watchdog timeout)"
                + (f": {ENGINE_ERRORS.text()}" if ENGINE_ERRORS.text() else ""),
                "see stderr for the scheduler's traceback; raise --watchdog-timeout if compiles are slow",
                EXIT_ENGINE, interrupted_phase=doing, signal=name))
        waited = None
        if self.swapper is not None and not self.swapper.idle.is_set():
            t = time.perf_counter()
            self.swapper.idle.wait(SWAP_FINISH_WAIT_S)
            waited = time.perf_counter() - t
        self.stop(ToolError("interrupted", f"{name} during {doing}", "the run was stopped; rerun to get a verdict",
                            STOP_SIGNALS[signum], signal=name, interrupted_phase=doing,
                            engine_holds=self.engine_holds(waited)))

    def stop(self, error: ToolError) -> None:
        """The run's end (finish: unless the run already wrote its verdict), then exit at once. Once: a second
        caller (the hosts' watcher and a signal at the same time) waits for the first one's exit."""
        if not self.stopping.acquire(blocking=False):
            threading.Event().wait()
        code = finish(self.phases, self.cfg, error)
        for f in self.cleanup:
            f()
        sys.stdout.flush()
        sys.stderr.flush()
        kill_engine_children()
        HOSTS.shutdown()
        os._exit(code)


# ----------------------------------------------------------------------------------------------
# The run: run() is the table of contents; main() and cli() (python run_param_swap.py, run-param-swap)
# ----------------------------------------------------------------------------------------------


def run(phases: PhaseLog, cfg: RunConfig, model_id: str) -> None:
    """The phases in the order they run (docs/phases.md); the table of contents of this file."""
    device, tp_size = jax_ready(phases, cfg)
    phases.begin("checkpoint")  # validation: config, tensors, parallelism, token budget
    info = read_checkpoint_info(resolve_checkpoint(model_id, cfg.download_dir))
    validate_checkpoint(info)
    validate_parallelism(info, tp_size)
    validate_cpu_devices(cfg, info, device, tp_size)
    if cfg.rounds and cfg.model_id_b:
        info_b = read_checkpoint_info(resolve_checkpoint(cfg.model_id_b, cfg.download_dir))
        validate_checkpoint(info_b)
        if expected_tensors(info_b) != expected_tensors(info):
            raise ToolError("checkpoint", f"--model-id-b {cfg.model_id_b} has other sizes than --model-id "
                            "(the engine's model)", "B must be the same architecture and sizes as A")
    prompt = chat_prompt(info.path, cfg.prompt) if cfg.chat else cfg.prompt
    cfg = cfg.resolved(model_id=info.path, tp_size=tp_size, prompt=prompt)
    validate_token_budget(cfg, info)
    stack = probe_sglang((info.architecture, cfg.moe_backend))  # what the swap uses of sglang-jax (exit 2)
    # The probe has imported sglang-jax: ~520k objects (modules, functions, classes) that never become garbage.
    # Freezing them leaves them out of every later collection, so each phase's gc.collect (device_memory) walks
    # only what the run makes: 0.35 s -> a few ms per phase line. The CLI's process only, never in the API:
    # an RL loop's own objects must stay collectable.
    gc.freeze()
    HOSTS.agree("checkpoint")  # several hosts: every one has validated its copy before any engine starts
    engine, swapper = engine_ready_dummy(phases, cfg, info, device, stack)
    state, load = swapper.state, None
    try:
        before = generate_result(phases, cfg, engine, phase="generate_before_swap")
        tree = mllm_params_cpu_ready(phases, cfg, info)
        trainer = None  # --weights-source trainer: the tree on the devices, held (as a trainer would) to the end
        try:
            if cfg.weights_source == "trainer":
                tree = trainer = mllm_params_device_ready(phases, cfg, swapper, tree)
            plan = sglang_param_dict_ready(phases, cfg, swapper, tree)
            if cfg.serve_load:
                load = ServeLoad(engine, swapper, cfg)
                load.start(phases)
            param_dict = weights_swapped_from_mllm(phases, cfg, swapper, load, tree, plan)
        except ToolError as e:
            if load is not None:
                load.after_failure(phases, e)
            check_restored(e, engine, cfg, before)
            raise
        if cfg.verify_param_sharing:
            param_sharing_check(phases, state, param_dict)
        if cfg.verify_weights:
            hold_for_collectives(load)
            weights_equal_loader(phases, state, info.path)
        if load is not None:
            load.hold()  # the memory phases below are sampled with no forward in flight
        if cfg.keep_param_dict:
            phases.phase("before_generate_param_dict_kept", num_arrays=len(param_dict),
                       **memory_split(state, swapper.guard, trainer))
        else:
            del param_dict
            phases.phase("after_cleanup")
        out = generate_result(phases, cfg, engine, load, logprobs=cfg.verify_logits)
        check_generate(phases)
        check_swap_effective(phases, before, out)
        if cfg.verify_logits and HOSTS.rank == 0:  # a host forward: on rank 0 only
            logits_match_reference(phases, cfg, info.path, out)
        if cfg.keep_param_dict:
            del param_dict
            phases.phase("after_drop_param_dict")
        check_single_copy(phases, cfg.single_copy_tolerance,
                          ["weights_swapped_from_mllm", "before_generate_param_dict_kept"])
        flat_b = plan_b = None
        if cfg.rounds:
            flat_b, plan_b = swap_rounds(phases, cfg, swapper, load, info, as_flat(tree), plan, out)
        if load is not None:
            serve_results(phases, cfg, load, as_flat(tree), plan, flat_b, plan_b)
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
    cfg = run_config(parse_args(argv))
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
        validate_args(cfg)
        configure_platform(cfg)
        skip_torch_unless_needed(cfg)
        if cfg.wandb:
            phases.sinks.append(WandbSink(cfg))
        model_id = cfg.model_id
        if cfg.demo:
            folder = cfg.demo_dir or (demo_tmp := tempfile.mkdtemp(prefix="param_swap_demo_"))
            if demo_tmp:
                phases.stopper.cleanup.append(functools.partial(shutil.rmtree, demo_tmp, ignore_errors=True))
            model_id = write_demo_checkpoint(folder, arch=cfg.arch)
            log(f"demo checkpoint in {folder}")
        run(phases, cfg, model_id)
        return finish(phases, cfg)
    except Exception as e:  # noqa: BLE001 - every failure ends in one error line, the summary, an exit code
        if not isinstance(e, ToolError) or (e.__cause__ is not None and e.exit_code != EXIT_BAD_INPUT):
            traceback.print_exc()  # bad input: its error line says it all; a failure: where it came from
        if not isinstance(e, ToolError):
            last = phases.records[-1]["phase"] if phases.records else "start"
            e = ToolError(f"after_{last}", f"{type(e).__name__}: {e}", "see the traceback on stderr", EXIT_ENGINE)
        return finish(phases, cfg, e)
    finally:
        if demo_tmp:
            shutil.rmtree(demo_tmp, ignore_errors=True)


def cli(argv: list[str] | None = None) -> None:
    """`python run_param_swap.py` and the console script `run-param-swap`: main(), then exit at once."""
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    HOSTS.shutdown()
    os._exit(code)  # sglang-jax's threads can hang or abort interpreter teardown; everything is written


if __name__ == "__main__":
    cli()
