"""The independent oracles: sglang-jax's own loader, bit for bit (--verify-weights), and transformers' float32
forward of the checkpoint on the host (--verify-logits). Neither shares code with the tool's mapping."""

import functools
import threading
import time

import numpy as np

from param_swap import memory
from param_swap import sglang_adapter as adapter
from param_swap.engine_state import EngineState
from param_swap.errors import ExitCode, ToolError
from param_swap.generation import Answer
from param_swap.hosts import HOSTS
from param_swap.phases import PhaseLog

# Per engine dtype: (largest |engine logprob - reference logprob| of a generated token, largest margin by
# which a generated token may trail the reference's argmax). Set from measured distributions: docs/phases.md.
LOGITS_TOLERANCE = {"float32": (0.1, 0.1), "bfloat16": (1.0, 1.0)}


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


def hold_for_collectives(load) -> None:
    """Several hosts: hold the load and let its requests in flight finish until the next answer releases it
    (ServeLoad.generate_alone): sglang-jax's loader runs cross-host collectives from this thread, which must not
    interleave with a forward's (docs/phases.md, "Several hosts")."""
    if load is not None and HOSTS.multi:
        load.hold()


def verify_weights(phases: PhaseLog, state: EngineState, model_path: str, swap: str = "first swap") -> bool:
    """Compare every engine Param (bits, shape, dtype, sharding) with what sglang-jax's own loader makes of
    `model_path`, one loaded tensor at a time (LoaderTap: no second set); records weights_equal_loader (every
    verified swap must pass) and returns this one's verdict. A failure of the oracle itself is exit 3."""
    phases.begin("weights_verified")
    t = time.perf_counter()
    base_rss, base = memory.process_rss_bytes(), memory.bytes_in_use_sum(memory.device_memory())
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
                peak = max(peak, memory.bytes_in_use_sum(memory.device_memory(collect=False)))
                peak_rss = max(peak_rss, memory.process_rss_bytes())
            except Exception as e:  # noqa: BLE001 - never into the loader (run_own_loader); raised below
                failed.append(f"{path}: {type(e).__name__}: {e}")

    try:
        adapter.run_own_loader(state.model_runner, model_path, on_assign)
    except Exception as e:  # noqa: BLE001 - sglang-jax's loader failing on the checkpoint is the oracle failing
        raise ToolError("weights_verified", f"sglang-jax's own loader failed on {model_path}: {type(e).__name__}: "
                        f"{e}", "see the traceback on stderr; the swap itself is done", ExitCode.ENGINE) from e
    if failed:
        raise ToolError("weights_verified", f"the weights oracle failed while comparing {failed[0]}"
                        + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""),
                        "the oracle itself failed, not a check: see stderr", ExitCode.ENGINE, oracle_errors=failed[:10])
    not_loaded = sorted(set(state.params) - set(loaded))
    unknown = sorted(set(loaded) - set(state.params))
    twice = sorted(p for p, n in loaded.items() if n > 1)
    param_bytes = memory.param_bytes_sum(p.get_value() for p in state.params.values())
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


def verify_logits(phases: PhaseLog, cfg, model_path: str, answer: Answer) -> bool:
    """The engine's logprob of each generated token against an independent float32 forward of the same
    checkpoint, and each token against the reference's argmax (within a margin, for near ties)."""
    if not answer.consistent:
        return phases.check("logits_match_reference", False, error="the engine's answer is inconsistent: "
                            + "; ".join(answer.consistency_problems))
    phases.begin("logits_verified")
    t = time.perf_counter()
    ref = reference_token_logprobs(model_path, answer.prompt_ids, answer.output_ids)
    tol, margin_tol = LOGITS_TOLERANCE.get(cfg.dtype, LOGITS_TOLERANCE["bfloat16"])
    tol = cfg.logprob_tolerance if cfg.logprob_tolerance is not None else tol
    margin_tol = cfg.argmax_margin if cfg.argmax_margin is not None else margin_tol
    engine_lp = answer.output_logprobs
    diffs = [abs(e - r) for e, r in zip(engine_lp, ref["logprobs"], strict=True)]
    margins = [b - r for b, r in zip(ref["argmax_logprobs"], ref["logprobs"], strict=True)]
    agree = sum(a == o for a, o in zip(ref["argmax"], answer.output_ids, strict=True))
    worst = sorted(range(len(diffs)), key=lambda i: -max(diffs[i] / tol, margins[i] / margin_tol))[:5]
    ok = max(diffs) <= tol and max(margins) <= margin_tol
    details = {"engine_dtype": cfg.dtype, "num_tokens": len(diffs), "logprob_tolerance": tol,
               "argmax_margin": margin_tol, "max_abs_logprob_diff": round(max(diffs), 6),
               "mean_abs_logprob_diff": round(sum(diffs) / len(diffs), 6), "max_margin": round(max(margins), 6),
               "argmax_agreement": f"{agree}/{len(diffs)}",
               "worst_tokens": [{"position": i, "token": answer.output_ids[i], "engine_logprob": round(engine_lp[i], 6),
                                 "reference_logprob": round(ref["logprobs"][i], 6), "reference_argmax": ref["argmax"][i],
                                 "margin": round(margins[i], 6)} for i in worst]}
    phases.check("logits_match_reference", ok, **details)
    phases.phase("logits_verified", sample_memory=not HOSTS.multi, ok=ok, **details, seconds=round(time.perf_counter() - t, 3),
               engine_logprobs=[round(v, 6) for v in engine_lp], reference_logprobs=[round(v, 6) for v in ref["logprobs"]],
               reference_argmax=ref["argmax"])
    return ok
