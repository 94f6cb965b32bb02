"""Generation: greedy, always max_new_tokens tokens, the ids as the scheduler generated them (Answer)."""

import dataclasses

from param_swap import engine_state, trees
from param_swap import sglang_adapter as adapter
from param_swap.errors import ExitCode, ToolError
from param_swap.hosts import HOSTS


@dataclasses.dataclass
class Answer:
    """The engine's greedy answer to one prompt, with its consistency cross-checks; answer["key"] also reads a
    field, for callers that index it like a dict."""
    text: str
    output_ids: list[int]
    num_tokens: int
    finish_reason: dict | None
    prompt_ids: list[int]
    api_output_ids_match: bool  # the engine's API output_ids equal the scheduler's (reported, not trusted)
    consistent: bool  # token count = completion_tokens = max_new_tokens, a logprob per token, text = decoding
    consistency_problems: list[str]
    meta_info: dict
    output_logprobs: list[float] | None = None  # with logprobs only

    def __getitem__(self, key: str):
        return getattr(self, key)

    def phase_fields(self) -> dict:
        """What a phase line shows of it (the prompt's ids and the logprobs left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("prompt_ids", "output_logprobs")}


def check_live(engine) -> None:
    """Raise ToolError (exit 3) before a request is sent if the forward would read a dead buffer: the engine's
    memory is released (stage engine_released: resume() first), or a trainer donated an array the engine aliases
    (stage engine_weights_deleted), which would crash the scheduler."""
    if adapter.engine_scheduler(engine) is None:  # not enable_single_process: no Params this tool could swap
        return
    model_runner = adapter.engine_model_runner(engine)
    leaves = adapter.leaves_of(model_runner)
    released = sum(not trees.on_devices(leaf) for leaf in leaves)
    kv_freed = len(adapter.kv_pool_buffers(model_runner)) if engine_state.kv_freed(model_runner) else 0
    if released or kv_freed:
        raise ToolError("engine_released", f"the engine's memory is released ({released} of its {len(leaves)} "
                        f"weights, {kv_freed} KV buffers): it cannot generate", "ParamSwapper.resume(tree) first "
                        "(release() gave the memory to the trainer's step)", ExitCode.ENGINE)
    deleted = sum(leaf.is_deleted() for leaf in leaves)
    if deleted:
        raise ToolError("engine_weights_deleted", f"{deleted} of the engine's {len(leaves)} weight buffers were "
                        "deleted before generation", "a trainer step donated arrays the engine aliases (alias=True "
                        "/ --alias): swap again after the step, swap without alias, or do not donate them",
                        ExitCode.ENGINE)


def greedy(max_new_tokens: int) -> dict:
    """Greedy sampling params; ignore_eos: every answer has max_new_tokens tokens, wherever an EOS falls."""
    return {"temperature": 0.0, "max_new_tokens": max_new_tokens, "ignore_eos": True}


def answer_of(engine, out: dict, max_new_tokens: int, logprobs: bool) -> Answer:
    """The engine's answer, with the scheduler's own ids and the consistency cross-checks (generate_greedy)."""
    meta = {k: v for k, v in out.get("meta_info", {}).items() if not k.endswith("logprobs")}
    record = adapter.request_recorder(engine).take(meta["id"])
    ids = record["output_ids"]
    decoded = adapter.engine_tokenizer(engine).decode(ids, skip_special_tokens=True)
    problems = []
    if not len(ids) == meta.get("completion_tokens") == max_new_tokens:
        problems.append(f"{len(ids)} ids, completion_tokens {meta.get('completion_tokens')}, "
                        f"max_new_tokens {max_new_tokens}")
    if logprobs and len(record["output_logprobs"] or []) != len(ids):
        problems.append(f"{len(record['output_logprobs'] or [])} logprobs for {len(ids)} ids")
    if out["text"] != decoded:
        problems.append("the engine's text is not the decoding of the generated ids")
    return Answer(text=out["text"], output_ids=ids, num_tokens=len(ids), finish_reason=meta.get("finish_reason"),
                  prompt_ids=record["prompt_ids"], api_output_ids_match=list(out.get("output_ids", [])) == ids,
                  consistent=not problems, consistency_problems=problems, meta_info=meta,
                  output_logprobs=record["output_logprobs"] if logprobs else None)


def generate_greedy(engine, prompt: str, max_new_tokens: int, logprobs: bool = False) -> Answer:
    """Greedy, ignore_eos, with the scheduler's own ids (the detokenizer's answer is not the generated sequence
    once it spans the scheduler's 50-token chunk: RequestRecorder). Several hosts: rank 0 sends the request (its
    scheduler hands it on to every host's) and every rank gets rank 0's answer."""
    check_live(engine)  # on every rank: a refusal ends every rank alike, none left waiting for rank 0's answer
    if HOSTS.rank:
        return Answer(**HOSTS.from_rank0("generate"))
    answer = answer_of(engine, engine.generate(prompt=prompt, return_logprob=logprobs,
                                               sampling_params=greedy(max_new_tokens)), max_new_tokens, logprobs)
    HOSTS.from_rank0("generate", dataclasses.asdict(answer))
    return answer
