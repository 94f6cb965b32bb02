"""--serve-load: requests in flight across every swap, and the three checks on them (none lost, no forward
step on a mix of weights, no stale cache after a swap)."""

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from param_swap import generation
from param_swap import sglang_adapter as adapter
from param_swap.errors import ExitCode, ToolError
from param_swap.generation import Answer
from param_swap.hosts import HOSTS
from param_swap.phases import PhaseLog
from param_swap.swapper import ParamSwapper, SwapResult
from param_swap.waits import TimedOut, wait_until_async

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


SERVE_WAIT_S = 300.0  # longest wait for load requests to reach the scheduler or to finish


class ServeLoad:
    """--serve-load N (made only then, by runner.run()): N clients on the engine's event loop, each sending
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
        self.prompts = load_prompts(adapter.engine_tokenizer(engine), cfg.prompt) if self.leader else []
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
        recorder, k = adapter.request_recorder(self.engine), 0
        while True:
            await self.go.wait()
            if self.stopping:
                return
            j, n = (i + k) % len(self.prompts), self.lengths[(i + k) % len(self.lengths)]
            k += 1
            rec = {"client": i, "prompt": j, "max_new_tokens": n, "submitted_s": self.now()}
            self.live[id(rec)] = (n, self.swapper.guard.forwards)
            try:
                out = await self.engine.async_generate(prompt=self.prompts[j], sampling_params=generation.greedy(n))
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
        try:
            await wait_until_async(ready, SERVE_WAIT_S, what, poll_s=0.01, max_poll_s=0.01)
        except TimedOut as e:
            raise ToolError("serve_load", str(e), "the engine stopped serving the load", ExitCode.ENGINE) from None

    async def busy(self) -> None:
        """Every client has a request in flight, the engine ran forward steps since, and a request of the
        longest kind is 1-3 forward steps old (rank 0), so that the next pause finds requests to hold (without
        the young one, every request in flight can finish before the pause is handled: docs/phases.md)."""
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
        self.swapper.run_on_loop(start())
        phases.phase("serve_load_started", clients=self.clients, prompts=self.prompts, max_new_tokens=self.lengths,
                   in_flight=self.in_flight, pause_mode=adapter.PAUSE_MODE)

    async def swap_under_load(self, source, plan, alias: bool, label: str, weights: str,
                              fresh: bool = True, trainer_held: Mapping[str, Any] | None = None) -> SwapResult:
        """One swap (ParamSwapper's path) once every client has a request in flight; recorded in `swaps`."""
        await self.busy()
        entry = {"swap": label, "weights": weights, "start_s": self.now()}
        self.swaps.append(entry)
        try:
            result = await self.swapper.swap_detailed(source, self.cfg.swap_mode, alias, self.cfg.rollback, plan,
                                                      trainer_held)
        except ToolError as e:
            g = self.swapper.guard
            entry.update(failed=e.error, restored=e.details.get("restored"), end_s=self.now(),
                         forwards_at_failure=g.forwards, on_previous_at_failure=g.by_weights.get(g.weights_id, 0))
            raise
        report = result.report.as_json()
        entry.update(end_s=self.now(), swap_s=report["swap_s"], serving_stopped_s=report["serving_stopped_s"],
                     serving_stopped_ratio=report["serving_stopped_ratio"], requests_paused=report["requests_paused"])
        self.pending = (label, weights) if fresh else None
        return result

    def hold(self) -> None:
        """Hold the clients and let the requests in flight finish (the next generate_alone() lets them go).
        Several hosts: every rank goes on once rank 0's requests have finished (its memory is sampled next)."""
        if not self.stopping:
            self.swapper.run_on_loop(self.drain())
            HOSTS.agree("serve_held")

    async def drain(self) -> None:
        self.go.clear()
        if not self.leader:
            return
        await self.wait_for("the load's requests in flight finishing", lambda: self.in_flight == 0)

    def generate_alone(self, prompt: str, max_new_tokens: int, logprobs: bool = False) -> Answer:
        """generate_greedy(), alone: with the load held and its requests in flight finished first."""
        if self.stopping:
            return generation.generate_greedy(self.engine, prompt, max_new_tokens, logprobs)
        self.swapper.run_on_loop(self.drain())
        try:
            out = generation.generate_greedy(self.engine, prompt, max_new_tokens, logprobs)
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

        self.swapper.run_on_loop(finish())

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

        s0, n0, f0 = self.swapper.run_on_loop(window([]))
        s1, n1, f1 = self.swapper.run_on_loop(window(swaps))
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

    def references(self, phases: PhaseLog, sources: dict[str, tuple]) -> dict[str, Answer]:
        """The checked prompt's answer for each weight set, on the idle engine: swapped in, then sglang-jax's
        own flush_cache (its answer must be success: nothing runs), then generated from an empty cache."""
        phases.begin("serve_reference")
        refs = {}
        for weights, (source, plan, alias) in sources.items():
            self.swapper.run_on_loop(self.swapper.swap_detailed(source, self.cfg.swap_mode, alias,
                                                                               self.cfg.rollback, plan))
            flushed = self.engine.flush_cache() if self.leader else None  # rank 0's reaches every scheduler
            if flushed is not None and not flushed.success:
                raise ToolError("serve_reference", f"flush_cache refused on the idle engine: {flushed.error_msg}",
                                "no request should be running once the load has finished", ExitCode.ENGINE)
            refs[weights] = generation.generate_greedy(self.engine, self.cfg.prompt, self.cfg.max_new_tokens)
        phases.phase("serve_reference", weights=sorted(refs), output_ids={w: r.output_ids for w, r in refs.items()})
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

    def check_fresh(self, phases: PhaseLog, refs: dict[str, Answer]) -> None:
        """serve_fresh_after_swap: the checked prompt, sent after each swap, answers exactly as its reference
        for that weight set (computed from an empty cache on the idle engine)."""
        rows = []
        for f in self.fresh:
            ids, ref = f["answer"].output_ids, refs[f["weights"]].output_ids
            rows.append({"swap": f["swap"], "weights": f["weights"], "equal": ids == ref,
                         "first_difference": next((i for i, (a, b) in enumerate(zip(ids, ref, strict=False)) if a != b),
                                                  None),
                         "cached_tokens": f["answer"].meta_info.get("cached_tokens")})
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


def swap_in(cfg, swapper: ParamSwapper, load: ServeLoad | None, tree, plan, alias: bool, label: str,
            weights: str, trainer_held: Mapping[str, Any] | None = None) -> SwapResult:
    """One swap through the API's path (pause, change, flush, continue), under the load when there is one."""
    if load is not None:
        return swapper.run_on_loop(load.swap_under_load(tree, plan, alias, label, weights, trainer_held=trainer_held))
    return swapper.run_on_loop(swapper.swap_detailed(tree, cfg.swap_mode, alias, cfg.rollback, plan, trainer_held))


def checked_answer(engine, cfg, load: ServeLoad | None, logprobs: bool = False) -> Answer:
    """The checked prompt's greedy answer (alone, with --serve-load: the load held, its requests finished)."""
    if load is not None:
        return load.generate_alone(cfg.prompt, cfg.max_new_tokens, logprobs)
    return generation.generate_greedy(engine, cfg.prompt, cfg.max_new_tokens, logprobs)
