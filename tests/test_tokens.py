"""The tokens the tool reports are the tokens the engine generated: the scheduler's record, against an
independent greedy decode (transformers, float32, token by token) around and past sglang-jax's 50-token
output chunk (101: past two chunks), one request and several at once. The engine runs in float32 so that no
bf16 rounding can flip an argmax; tp 1 (a float32 engine on more CPU devices than cores deadlocks in XLA's
CPU all-reduce, and the tool refuses it: docs/phases.md, exit codes)."""

import json
import subprocess
import sys

import pytest
from conftest import ENGINE_TIMEOUT, ROOT, clean_env

from param_swap import errors, generation
from param_swap import sglang_adapter as adapter


@pytest.mark.engine
def test_reported_ids_equal_an_independent_greedy_decode(checkpoint):
    folder = checkpoint(tied=False, num_kv_heads=2)
    proc = subprocess.run([sys.executable, "tests/greedy_probe.py", "--model-id", folder, "--device", "cpu",
                           "--tp-size", "1", "--dtype", "float32", "--lengths", "20,49,50,51,101"],
                          capture_output=True, text=True, env=clean_env(), cwd=ROOT, timeout=ENGINE_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-12000:]  # a hang: the probe's thread stacks (faulthandler)
    cases = json.loads(proc.stdout.strip().splitlines()[-1])["cases"]
    assert [(c["requests"], c["max_new_tokens"]) for c in cases] == [(1, n) for n in (20, 49, 50, 51, 101)] + [(3, 101)] * 3
    for case in cases:
        assert len(case["ids"]) == case["max_new_tokens"] and case["consistent"], case
        assert case["ids"] == case["independent_ids"], case
    # a shorter request is the start of a longer one (greedy), alone or in the batch (its first prompt is the
    # same): the 40-token answer used to be 39 ids
    assert cases[0]["ids"] == cases[4]["ids"][:20] == cases[5]["ids"][:20]


def test_generate_flags_an_inconsistent_answer():
    """generate()'s consistency check, without an engine: a record whose length is not completion_tokens."""

    class Tokenizer:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(65 + i % 26) for i in ids)

    class Recorder:
        def __init__(self, ids):
            self.ids = ids

        def take(self, rid):
            return {"prompt_ids": [1, 2], "output_ids": self.ids, "output_logprobs": None}

    class Engine:
        def __init__(self, ids, completion, text):
            self.scheduler_info = {"request_recorder": Recorder(ids)}
            self.tokenizer_manager = type("TM", (), {"tokenizer": Tokenizer()})()
            self.answer = {"text": text, "output_ids": ids, "meta_info": {"id": "r", "completion_tokens": completion,
                                                                          "finish_reason": {"type": "length"}}}

        def generate(self, **kwargs):
            return self.answer

    good = generation.generate_greedy(Engine([0, 1, 2], 3, "ABC"), "p", 3)
    assert good["consistent"] and good["output_ids"] == [0, 1, 2]
    short = generation.generate_greedy(Engine([0, 1], 3, "AB"), "p", 3)
    assert not short["consistent"] and "2 ids, completion_tokens 3" in short["consistency_problems"][0]
    wrong_text = generation.generate_greedy(Engine([0, 1, 2], 3, "ABD"), "p", 3)
    assert wrong_text["consistency_problems"] == ["the engine's text is not the decoding of the generated ids"]


def test_recorder_keeps_the_scheduler_lists_and_drops_untaken_records_oldest_first():
    class Req:
        def __init__(self, rid):
            self.rid, self.origin_input_ids, self.output_ids = rid, [1, 2], [3, 4, 5]
            self.output_token_logprobs_val = None

        def finished(self):
            return True

    sent = []
    scheduler = type("Scheduler", (), {})()
    scheduler.stream_output = lambda reqs, *a, **k: sent.append([r.rid for r in reqs])
    recorder = adapter.RequestRecorder(scheduler, keep=2)
    scheduler.stream_output([Req("a"), Req("b")])
    scheduler.stream_output([Req("c")])
    assert sent == [["a", "b"], ["c"]]  # the scheduler's own output still goes out
    assert list(recorder.finished) == ["b", "c"]
    assert recorder.take("c") == {"prompt_ids": [1, 2], "output_ids": [3, 4, 5], "output_logprobs": None}
    try:
        recorder.take("a")
    except errors.ToolError as e:
        assert e.exit_code == errors.EXIT_ENGINE and "no record" in e.error
    else:
        raise AssertionError("a dropped record must not be returned")
