"""The command line: the flags, in argument groups, and RunConfig, the run's frozen settings."""

from __future__ import annotations

import argparse
import difflib
import enum
import sys

from param_swap.errors import ExitCode, ToolError
from param_swap.families import FAMILIES
from param_swap.hosts import DEFAULT_HOST_LOST_S, HEARTBEAT_S
from param_swap.oracles import LOGITS_TOLERANCE
from param_swap.stats import TRANSPOSE_ON, SwapMode, Transpose
from param_swap.swapper import DEFAULT_BUCKET_MB

DEFAULT_MODEL_ID = "Qwen/Qwen2.5-3B-Instruct"
HOST_DTYPES = ("bfloat16", "float16", "float32")


class WeightsSource(enum.StrEnum):
    SAFETENSORS = "safetensors"  # the shards read lazily with numpy (no torch)
    TORCH = "torch"  # transformers.AutoModelForCausalLM(...).state_dict()
    TRAINER = "trainer"  # the safetensors put on the devices as a trainer holds them, then swapped device to device


class TrainerSharding(enum.StrEnum):
    FSDP = "fsdp"  # first axis split over all devices where it divides, else replicated
    REPLICATED = "replicated"
    ENGINE = "engine"  # each target's shape, dtype and sharding where the layouts match


DESCRIPTION = ("Hot-swap an RL trainer's Qwen2/Qwen3/Llama/Qwen3-MoE weights into a running sglang-jax Engine, in "
               "place, and prove the engine then computes with exactly those weights.")
EPILOG = """\
Prints one JSON line per phase on stdout (logs go to stderr) with device memory summed over devices, then a
summary with the checks. Phases, in the order they run ([] only with their flag; docs/phases.md):
  jax_ready -> engine_ready_dummy -> generate_before_swap -> mllm_params_cpu_ready -> [mllm_params_device_ready]
  -> sglang_param_dict_ready -> [serve_load_started] -> weights_swapped_from_mllm -> [param_sharing_check]
  -> [weights_verified] -> before_generate_param_dict_kept | after_cleanup -> generate_result
  -> [logits_verified] -> [after_drop_param_dict] -> [swap_round (-> weights_verified) ...]
  -> [serve_reference -> serve_load] -> [(weights_verified ->) rl_step ...] -> summary

Exit codes: 0 every check passed; 1 a verification check failed; 2 bad input or usage (found before the engine
is touched); 3 the engine failed (start, generate, swap or crash); 130 / 143 stopped by SIGINT / SIGTERM (still
with its error line and summary; a swap in progress completes first). With --nnodes, every rank exits alike.

  python run_param_swap.py --demo                        # tiny random Qwen2, 4 virtual CPU devices
  python run_param_swap.py --demo --arch qwen3_moe       # ... of another family: qwen3, llama, qwen3_moe
  python run_param_swap.py --model-id Qwen/Qwen2.5-3B-Instruct --tp-size 4 --chat \\
      --keep-param-dict --verify-param-sharing --verify-weights --verify-logits | tee swap.log   # TPU VM
  python run_param_swap.py --model-id DIR --tp-size 8 --nnodes 2 --node-rank R --dist-init-addr IP:PORT \\
      --verify-weights > swap.log        # on every host of a pod slice (rank R), rank 0's IP: docs/tpu.md
  python run_param_swap.py --demo --rl-steps 3          # + the colocated RL cycle: release, train, resume
  run-param-swap --demo                                  # the same, installed (pip install ".[cpu]")
  python dist/run_param_swap.pyz --demo                  # the same, one file (make pyz)
"""


def add_checkpoint_and_prompt_flags(run) -> None:
    run.add_argument("--model-id", default=DEFAULT_MODEL_ID, help="HF hub id or local folder (default: %(default)s)")
    run.add_argument("--download-dir", default=None, help="HF cache folder for hub downloads")
    run.add_argument("--prompt", default="Explain what a parameter hot-swap is in one sentence.")
    run.add_argument("--chat", action="store_true",
                     help="wrap --prompt as a user message with the tokenizer's chat template (instruct checkpoints)")
    run.add_argument("--max-new-tokens", type=int, default=64)
    run.add_argument("--demo", action="store_true",
                     help="build a tiny random-weight checkpoint (--arch) and run the whole verification with "
                          "--keep-param-dict --verify-param-sharing --verify-weights --verify-logits: on 4 virtual "
                          "CPU devices, or with --device gpu|tpu on all of that platform's devices")
    run.add_argument("--demo-dir", default=None, help="where --demo writes its checkpoint (kept); default: a temp folder")
    run.add_argument("--arch", choices=[f.arch for f in FAMILIES.values()], default="qwen2",
                     help="--demo: the model family of the tiny checkpoint (default: %(default)s)")


def add_swap_flags(swap) -> None:
    swap.add_argument("--weights-source", choices=list(WeightsSource), default=None,
                      help="safetensors: read the shards lazily with numpy (no torch); torch: "
                           "transformers.AutoModelForCausalLM(...).state_dict(); trainer: read the safetensors, put "
                           "the tree on the devices as a trainer holds it (--trainer-sharding), then swap device to "
                           "device (no host round trip). Default: safetensors (--demo --rl-steps: trainer)")
    swap.add_argument("--trainer-sharding", choices=list(TrainerSharding), default=None,
                      help="--weights-source trainer: fsdp (default; first axis split over all devices where it "
                           "divides, else replicated, in --mllm-param-dtype), replicated, or engine (each target's "
                           "shape, dtype and sharding where the layouts match)")
    swap.add_argument("--alias", action="store_true",
                      help="--weights-source trainer: where a trainer array already is the target (shape, dtype, "
                           "sharding), the engine's Param becomes that very array: no copy. A trainer that donates "
                           "it to its next step deletes the engine's weight (caught before generation, exit 3)")
    swap.add_argument("--mllm-param-dtype", choices=sorted(HOST_DTYPES), default="bfloat16",
                      help="dtype of the MLLM flax tree on the host (the trainer's); cast to the engine's dtype "
                           "on the host when placing")
    swap.add_argument("--swap-mode", choices=list(SwapMode), default=SwapMode.STREAMING,
                      help="streaming: place a bucket of tensors (--bucket-mb), assign them, free the arrays they "
                           "replace, go on (peak = one set + one bucket or the largest tensor); bulk: build every "
                           "array, then assign all (the reference algorithm, peak = two sets)")
    swap.add_argument("--bucket-mb", type=float, default=None,
                      help="streaming: device MB (summed over devices) placed before they are assigned; 0 = one "
                           f"tensor at a time (default: {DEFAULT_BUCKET_MB:g}, chosen in docs/benchmarks.md; --demo: "
                           "1, so that its 11 MB of params span several buckets)")
    swap.add_argument("--transpose", choices=list(Transpose), default=Transpose.AUTO,
                      help="where kernels stored [out, in] become [in, out]: host (the strided view handed to "
                           "jax.device_put), device (placed as stored, one jitted transpose on the devices); auto: "
                           + ", ".join(f"{k} {v}" for k, v in TRANSPOSE_ON.items()) + " (docs/benchmarks.md)")
    swap.add_argument("--no-rollback", dest="rollback", action="store_false", default=None,
                      help="no rollback: a failure mid-swap then shuts the engine down (exit 3) instead of "
                           "restoring the previous weights. Default: rollback whenever it is free (the previous "
                           "weights came from a read-only host tree or from the dummy initialiser: placed again on "
                           "failure), else a host copy of each replaced array for host sources and none for "
                           "--weights-source trainer (a copy would go device->host)")
    swap.add_argument("--rollback", dest="rollback", action="store_true",
                      help="rollback also where it costs a host copy of each replaced array (--weights-source trainer)")
    swap.add_argument("--allow-nonfinite", action="store_true",
                      help="swap in weights that hold NaN or infinite values. Default: refused (exit 2, the tensors "
                           "named, the engine on its previous weights): each bucket is checked on the devices as "
                           "placed, before generation continues (the whole tree before any of it is assigned where "
                           "the swap has no rollback)")
    swap.add_argument("--keep-param-dict", action="store_true",
                      help="keep the {nnx path: jax.Array} dict alive through generation (it shares the engine's "
                           "arrays)")


def add_verification_flags(verify) -> None:
    for flag, help_ in (
            ("--verify-param-sharing", "check that EVERY engine Param and model_state_leaves entry is the dict's very "
                                       "array (object identity and device buffers)"),
            ("--verify-weights", "check weights_equal_loader: after the swap, compare EVERY engine Param (bits, shape, "
                                 "dtype, sharding) with what sglang-jax's own loader makes of the checkpoint, tensor "
                                 "by tensor, in this process"),
            ("--verify-logits", "check logits_match_reference: the engine's logprob of each generated token against "
                                "transformers' float32 forward of the checkpoint on the host (needs torch)")):
        verify.add_argument(flag, action="store_true", help=help_)
    verify.add_argument("--logprob-tolerance", type=float, default=None,
                        help="--verify-logits: largest |engine - reference| logprob per token (default by engine "
                             "dtype: " + ", ".join(f"{k} {v[0]:g}" for k, v in LOGITS_TOLERANCE.items()) + ")")
    verify.add_argument("--argmax-margin", type=float, default=None,
                        help="--verify-logits: largest gap between the reference's top logprob and the generated "
                             "token's (default by engine dtype: "
                             + ", ".join(f"{k} {v[1]:g}" for k, v in LOGITS_TOLERANCE.items()) + ")")
    verify.add_argument("--single-copy-tolerance", type=float, default=1.02,
                        help="bytes_in_use_sum after the swap may be at most engine_ready_dummy x this (default: "
                             "%(default)s)")
    verify.add_argument("--rounds", type=int, default=0,
                        help="after the first swap, swap N more times alternating B (a deterministic perturbation, "
                             "or --model-id-b) and A, checking outputs repeat and memory does not grow")
    verify.add_argument("--model-id-b", default=None, help="second checkpoint for --rounds (default: perturbed A)")


def add_rl_cycle_flags(rl) -> None:
    rl.add_argument("--rl-steps", type=int, default=0, metavar="N",
                    help="after the first swap, N colocated RL steps: release the engine's memory (KV cache and "
                         "weights), the trainer's donating AdamW step on the same devices (a synthetic gradient), "
                         "resume with the new params, roll out; checks rl_released, rl_no_recompile (N >= 2) and "
                         "rl_weights_follow_trainer. Needs --weights-source trainer (--demo: implied, with "
                         "--trainer-sharding engine --alias)")
    rl.add_argument("--rl-learning-rate", type=float, default=1e-2,
                    help="--rl-steps: AdamW's learning rate (default: %(default)s)")
    rl.add_argument("--rl-save", default=None, metavar="DIR",
                    help="--rl-steps: keep the last step's params here as an HF checkpoint (loadable by transformers "
                         "and sglang-jax)")


def add_serving_flags(serve) -> None:
    serve.add_argument("--serve-load", type=int, default=0, metavar="N",
                       help="keep N greedy requests in flight (clients sending one after another, prompts and "
                            "lengths varied, some spanning a swap) across the first swap and every --rounds swap, "
                            "and check serve_no_lost_requests, serve_no_mixed_forward and serve_fresh_after_swap; "
                            "reports how long each swap stops serving and requests/s with and without swaps")
    serve.add_argument("--serve-seconds", type=float, default=10.0,
                       help="--serve-load: length of each requests/s window, without and with swaps (default: "
                            "%(default)s)")


def add_hosts_flags(hosts) -> None:
    hosts.add_argument("--nnodes", type=int, default=1,
                       help="hosts of a multi-host slice (a TPU pod: one process per host). Run the same command on "
                            "every host with its --node-rank; rank 0 prints the phase JSON, every rank exits with "
                            "the same code (docs/tpu.md). With --device cpu each process makes tp/nnodes virtual "
                            "devices")
    hosts.add_argument("--node-rank", type=int, default=0, help="this host's rank, 0 .. nnodes-1")
    hosts.add_argument("--dist-init-addr", default=None, metavar="HOST:PORT",
                       help="--nnodes > 1: rank 0's address for JAX's coordination service (sglang-jax also uses "
                            "PORT+5 and PORT+6 there); a loopback HOST binds to it only")
    hosts.add_argument("--host-lost-after", type=float, default=DEFAULT_HOST_LOST_S, metavar="S",
                       help=f"--nnodes > 1: a rank whose heartbeat (every {HEARTBEAT_S:g} s) stops for S seconds "
                            "is lost: every other rank ends with an error line naming it and its phase (exit 3) "
                            "instead of JAX's own fatal abort after 100 s (default: %(default)s)")


def add_output_flags(out) -> None:
    out.add_argument("--json-out", default=None, help="also write the JSON lines to this file")
    out.add_argument("--plot", default=None, metavar="FILE.png",
                     help="bar chart of bytes_in_use_sum per phase, with the one-set-of-params level marked")
    out.add_argument("--wandb", action="store_true",
                     help="log each phase's memory and timings to Weights & Biases (process 0 only; a W&B "
                          "failure is a warning, never a failed run)")
    out.add_argument("--wandb-project", default="param-swap")


def add_engine_flags(eng) -> None:
    eng.add_argument("--device", choices=["tpu", "gpu", "cpu"], default=None,
                     help="JAX platform (default: $JAX_PLATFORMS, else JAX's default backend). With cpu the "
                          "tool creates --tp-size virtual CPU devices itself.")
    eng.add_argument("--tp-size", type=int, default=0, help="tensor parallel size; 0 = all devices")
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
    eng.add_argument("--moe-backend", choices=["epmoe", "fused", "auto"], default="epmoe",
                     help="Qwen3-MoE: sglang-jax's expert layout (default: %(default)s, sglang-jax's own; fused "
                          "is a TPU kernel); the swap maps to whichever the engine uses")


class Parser(argparse.ArgumentParser):
    """argparse's parser, but a bad command line (an unknown flag, a bad or missing value, a value out of its
    choices) raises ToolError stage `arguments` instead of exiting with text only: the run ends in one error line
    and the summary like every other bad input (users grep the JSON). The short usage still goes to stderr;
    --help is argparse's."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr, flush=True)
        raise ToolError("arguments", message, self.hint(message), ExitCode.BAD_INPUT)

    def hint(self, message: str) -> str:
        """The closest flag to each unknown one (`--bucket-mbb` -> `--bucket-mb`), and where every flag is listed."""
        known = sorted(o for o in self._option_string_actions if o.startswith("--"))
        unknown = message.split("unrecognized arguments:", 1)[1].split() if "unrecognized arguments:" in message else []
        meant = [f"{close[0]} (not {word})" for word in unknown if word.startswith("--")
                 for close in [difflib.get_close_matches(word.split("=", 1)[0], known, n=1, cutoff=0.6)] if close]
        return (f"did you mean {', '.join(meant)}? " if meant else "") + "--help lists every flag and its values"


def json_out_of(argv: list[str] | None) -> str | None:
    """--json-out's value on a command line that does not parse (its error line goes there too), as argparse
    reads it (the last one, an abbreviation, `=`), or None."""
    only = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    only.add_argument("--json-out")
    try:
        return only.parse_known_args(sys.argv[1:] if argv is None else argv)[0].json_out
    except (argparse.ArgumentError, SystemExit):
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line -> the flags as given (ToolError stage `arguments` if it does not parse)."""
    p = Parser(description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_and_prompt_flags(p.add_argument_group("checkpoint and prompt"))
    add_swap_flags(p.add_argument_group("swap"))
    add_verification_flags(p.add_argument_group("verification"))
    add_rl_cycle_flags(p.add_argument_group("RL cycle"))
    add_serving_flags(p.add_argument_group("serving"))
    add_hosts_flags(p.add_argument_group("several hosts"))
    add_output_flags(p.add_argument_group("output"))
    add_engine_flags(p.add_argument_group("engine (defaults: the reference TPU run's)"))
    return p.parse_args(argv)


class RunConfig(argparse.Namespace):
    """The run's settings: the flags (same names), with every default that depends on another flag resolved
    (run_config, before anything starts), then the facts only the run can know filled in once (resolved(), in
    run(): the mesh size, the demo's checkpoint folder, the chat-wrapped prompt). Frozen afterwards."""

    def __init__(self, **settings):
        for name, value in settings.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"RunConfig is frozen ({name}): run_config() and resolved() make it")

    def resolved(self, **facts) -> RunConfig:
        return RunConfig(**{**vars(self), **facts})


def run_config(args: argparse.Namespace) -> RunConfig:
    """The flags as parsed -> the run's frozen settings. --demo: 4 virtual CPU devices unless --device names
    another platform (then all its devices), both oracles, --keep-param-dict --verify-param-sharing, and 1 MB
    buckets so that the tiny model spans several; with --rl-steps, a trainer's tree in the engine's layout,
    aliased."""
    rl_demo = args.demo and args.rl_steps > 0
    source = WeightsSource(args.weights_source or (WeightsSource.TRAINER if rl_demo else WeightsSource.SAFETENSORS))
    derived = {"bucket_mb": DEFAULT_BUCKET_MB if args.bucket_mb is None else args.bucket_mb,
               "weights_source": source, "swap_mode": SwapMode(args.swap_mode), "transpose": Transpose(args.transpose),
               "trainer_sharding": TrainerSharding(args.trainer_sharding) if args.trainer_sharding else
               TrainerSharding.ENGINE if rl_demo else TrainerSharding.FSDP if source == WeightsSource.TRAINER else None,
               "alias": args.alias or (rl_demo and source == WeightsSource.TRAINER)}
    if args.demo:
        device = args.device or "cpu"
        derived.update(device=device, tp_size=args.tp_size or (4 if device == "cpu" else 0),
                       bucket_mb=1.0 if args.bucket_mb is None else args.bucket_mb, keep_param_dict=True,
                       verify_param_sharing=True, verify_weights=True, verify_logits=True)
    return RunConfig(**{**vars(args), **derived})
