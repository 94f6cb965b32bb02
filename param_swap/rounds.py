"""--rounds: swap back and forth between A and B (a deterministic perturbation of A, or --model-id-b); answers
must repeat and memory must not grow. And the serving figures that close a --serve-load run."""

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from param_swap import checkpoint, checks, oracles, serve_load, trees
from param_swap.checkpoint import CheckpointInfo
from param_swap.errors import ToolError
from param_swap.flags import RunConfig
from param_swap.generation import Answer
from param_swap.phases import PhaseLog
from param_swap.serve_load import ServeLoad
from param_swap.swapper import ParamSwapper


class PerturbedWeights(Mapping):
    """Weight set B for --rounds: every matrix w of A as 0.02 - w, made one tensor at a time as the swap reads it,
    so B needs no second copy and lands in A's sharding. Plain negation would not do: it is an exact symmetry of
    these models (docs/phases.md, rounds_consistent), and the answers would not change."""

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

    if not isinstance(source, PerturbedWeights) or not all(trees.on_devices(a) for a in trees.source_arrays(source)):
        return source, 0.0
    t = time.perf_counter()
    made = {k: source[k] for k in source}
    jax.block_until_ready(list(made.values()))
    return made, time.perf_counter() - t


def weights_b(cfg, swapper: ParamSwapper, flat_a):
    """B's tree, its plan, and its checkpoint folder (None for the perturbed copy of A)."""
    if not cfg.model_id_b:
        return PerturbedWeights(flat_a), swapper.plan(flat_a), None
    info_b = checkpoint.read_checkpoint_info(checkpoint.resolve_checkpoint(cfg.model_id_b, cfg.download_dir))
    flat_b = trees.flatten(checkpoint.read_mllm_tree(info_b, cfg.weights_source, cfg.mllm_param_dtype)[0])
    return flat_b, swapper.plan(flat_b), info_b.path


def alias_for(cfg: RunConfig, source) -> bool:
    """--alias where the source is on the devices (a perturbed B of a trainer tree is too)."""
    return cfg.alias and all(trees.on_devices(a) for a in trees.source_arrays(source))


def swap_rounds(phases: PhaseLog, cfg: RunConfig, swapper: ParamSwapper, load: ServeLoad | None, info: CheckpointInfo,
                flat_a, plan_a, first_output: Answer) -> tuple:
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
            report = serve_load.swap_in(cfg, swapper, load, source, plan, alias_for(cfg, source), f"round {r}",
                                        which, trainer_held).report.as_json()
        except ToolError as e:
            if load is not None:
                load.after_failure(phases, e)
            checks.check_restored(e, engine, cfg, last_output)
            raise
        checkpoint_path = info.path if which == "A" else path_b
        if cfg.verify_weights and checkpoint_path:  # a perturbed B has no checkpoint to load
            oracles.hold_for_collectives(load)
            oracles.verify_weights(phases, swapper.state, checkpoint_path, swap=f"round {r}")
        out = serve_load.checked_answer(engine, cfg, load)
        outputs[which].append(out.output_ids)
        phases.answers.append((f"swap_round {r}", out))
        last_output = out
        if report["engine_bytes_sum"] > limit or not report["leaves_unchanged"]:
            leaks.append({"round": r, "engine_bytes_sum": report["engine_bytes_sum"],
                          "leaves_ok": report["leaves_unchanged"]})
        phases.phase("swap_round", round=r, weights=which, weights_made_s=round(made_s, 4), **report,
                   output_ids=out.output_ids, text=out.text, finish_reason=out.finish_reason)
    first_a = first_output.output_ids
    b_runs = outputs["B"]
    phases.check("rounds_consistent",
               all(o == first_a for o in outputs["A"]) and all(o == b_runs[0] for o in b_runs) and b_runs[0] != first_a,
               rounds=cfg.rounds, a_output_ids=first_a, b_output_ids=b_runs[0],
               a_rounds_equal=sum(o == first_a for o in outputs["A"]), a_rounds=len(outputs["A"]),
               b_rounds_equal=sum(o == b_runs[0] for o in b_runs), b_rounds=len(b_runs))
    phases.check("rounds_no_leak", not leaks, limit=limit, failed_rounds=leaks)
    checks.check_generate(phases)
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
