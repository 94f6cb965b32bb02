"""Property-based fuzzing of the inputs (hypothesis): config.json fields and safetensors headers.

Validation level (in process, no engine, many cases): every case passes or raises ToolError with exit code 2,
never another exception, and the verdict is the one an independent reading of the edit expects (expected_*:
what must be refused, what must pass, and the few edits whose verdict belongs to transformers). Whole-tool
level (a few cases, subprocesses): a config that validation lets through with odd but valid values runs the
tool to the end with exit 0 and every check passed; a context too short for the prompt is exit 2.
"""

import json
import os
import shutil
import struct
import tempfile

import pytest
from conftest import run_tool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from param_swap import checkpoint as ckpt
from param_swap import errors, validation

MISSING = object()
FIELDS = ["num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size", "intermediate_size",
          "vocab_size", "head_dim", "tie_word_embeddings", "max_position_embeddings", "architectures",
          "model_type", "torch_dtype", "rope_theta", "rms_norm_eps"]
VALUES = st.one_of(st.just(MISSING), st.integers(-3, 0), st.integers(1, 4096), st.text(max_size=4), st.none(),
                   st.floats(allow_nan=True, allow_infinity=True), st.lists(st.integers(0, 9), max_size=2),
                   st.booleans(), st.just(["LlamaForCausalLM"]))
SETTINGS = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "60")), deadline=None,
                    derandomize=not os.environ.get("FUZZ_EXAMPLES"),
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def base(checkpoint):
    return checkpoint(tied=False, num_kv_heads=2)


def variant(base: str, config: dict | None = None, header_edit=None) -> str:
    """A copy of `base` (tensors and tokenizer linked) with another config.json or a rewritten header."""
    folder = tempfile.mkdtemp(prefix="fuzz_")
    for name in os.listdir(base):
        if name != "config.json" and not (header_edit and name == "model.safetensors"):
            os.symlink(os.path.join(base, name), os.path.join(folder, name))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config if config is not None else json.load(open(os.path.join(base, "config.json"))), f)
    if header_edit:
        raw = open(os.path.join(base, "model.safetensors"), "rb").read()
        (n,) = struct.unpack("<Q", raw[:8])
        header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
        blob = header_edit(header, data)
        with open(os.path.join(folder, "model.safetensors"), "wb") as f:
            f.write(blob)
    return folder


def validate(folder: str) -> bool:
    """Everything the tool checks before JAX or the engine start: True if it refuses the checkpoint (always a
    ToolError with exit 2 and a message), False if it passes."""
    try:
        info = ckpt.read_checkpoint_info(folder)
        ckpt.validate_checkpoint(info)
        validation.validate_parallelism(info, 4)
        return False
    except errors.ToolError as e:
        assert e.exit_code == 2, e.record()
        assert e.record()["error"]
        return True
    finally:
        shutil.rmtree(folder, ignore_errors=True)


REFUSE, PASS, EITHER = "refused", "passes", "either"
SHAPES = ["num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size", "intermediate_size",
          "vocab_size"]  # any other value changes the tensors' shapes or count: the checkpoint no longer fits


def is_int(v) -> bool:
    return type(v) is int  # noqa: E721 - not bool, not float


def expected_config(base: dict, field: str, value) -> str:
    """The verdict one edit of config.json must get, read from the edit alone (not from the tool's code)."""
    if value is not MISSING and value == base.get(field, MISSING) and type(value) is type(base.get(field)):
        return PASS  # no change
    if field in SHAPES:  # transformers' defaults for a missing field are a 7B model's: no tensor fits
        return REFUSE
    if field == "max_position_embeddings":  # only the token budget reads it (not validated here)
        return PASS if value is MISSING or (is_int(value) and value >= 1) else REFUSE
    if field == "head_dim":  # absent or null: hidden_size / num_attention_heads = 128, the tensors' own
        return PASS if value is MISSING or value is None else REFUSE
    if field == "architectures":  # absent or not a list: model_type "qwen2" is no architecture the tool swaps
        return PASS if isinstance(value, list) and value[:1] == ["Qwen2ForCausalLM"] else REFUSE
    if field == "tie_word_embeddings":  # tied: the untied checkpoint's lm_head is left out, as HF does
        return PASS if value is MISSING or isinstance(value, bool) else EITHER
    if field in ("rope_theta", "rms_norm_eps", "torch_dtype"):  # read by the engine, not by validation
        return PASS if value is MISSING or isinstance(value, float) and field != "torch_dtype" else EITHER
    return EITHER  # model_type: AutoConfig picks its class by it (or by the folder's name when absent)


def combined(verdicts) -> str:
    verdicts = list(verdicts)
    return REFUSE if REFUSE in verdicts else PASS if all(v == PASS for v in verdicts) else EITHER


def assert_verdict(refused: bool, expected: str, what) -> None:
    if expected != EITHER:
        assert refused == (expected == REFUSE), f"{what}: expected {expected}, got {'refused' if refused else 'passes'}"


@SETTINGS
@given(edits=st.dictionaries(st.sampled_from(FIELDS), VALUES, min_size=1, max_size=3))
def test_config_fields(base, edits):
    original = json.load(open(os.path.join(base, "config.json")))
    config = dict(original)
    for field, value in edits.items():
        if value is MISSING:
            config.pop(field, None)
        else:
            config[field] = value
    expected = combined(expected_config(original, f, v) for f, v in edits.items())
    assert_verdict(validate(variant(base, config)), expected, edits)


def pack(header: dict, data: bytes) -> bytes:
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


HEADER_EDITS = st.one_of(
    st.tuples(st.just("offsets"), st.lists(st.integers(-10, 10_000_000), min_size=0, max_size=3)),
    st.tuples(st.just("dtype"), st.one_of(st.sampled_from(["BF16", "F16", "F32", "F64", "I8", "BOOL", "U8"]),
                                          st.text(max_size=3), st.integers())),
    st.tuples(st.just("shape"), st.one_of(st.lists(st.integers(-2, 2048), max_size=3), st.text(max_size=2),
                                          st.none())),
    st.tuples(st.just("rename"), st.text(max_size=12)),
    st.tuples(st.just("drop"), st.none()),
    st.tuples(st.just("not_a_dict"), st.one_of(st.integers(), st.text(max_size=3), st.lists(st.integers()))),
    st.tuples(st.just("header_length"), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("truncate"), st.integers(0, 100_000)),
)


@SETTINGS
@given(edit=HEADER_EDITS, which=st.integers(0, 1000))
def test_safetensors_headers(base, edit, which):
    kind, value = edit
    expected = []

    def header_edit(header: dict, data: bytes) -> bytes:
        names = sorted(k for k in header if k != "__metadata__")
        name = names[which % len(names)]
        entry = dict(header[name])
        nbytes = entry["data_offsets"][1] - entry["data_offsets"][0]
        full = pack(header, data)
        if kind == "offsets":
            header[name]["data_offsets"] = value
            start_end = len(value) == 2 and all(isinstance(o, int) for o in value) and 0 <= value[0] <= value[1]
            elsewhere = start_end and value[1] - value[0] == nbytes and value[1] <= len(data)
            expected.append(PASS if value == entry["data_offsets"] else EITHER if elsewhere else REFUSE)
        elif kind == "dtype":  # BF16 <-> F16 keeps every byte count: the dtype is not the model's to check
            header[name][kind] = value
            expected.append(PASS if value in ("BF16", "F16") and entry["dtype"] in ("BF16", "F16") else REFUSE)
        elif kind == "shape":
            header[name][kind] = value
            expected.append(PASS if value == entry["shape"] else REFUSE)
        elif kind == "rename":
            header[value] = header.pop(name)
            expected.append(PASS if value == name else REFUSE)
        elif kind in ("drop", "not_a_dict"):
            if kind == "drop":
                header.pop(name)
            else:
                header[name] = value
            expected.append(REFUSE)
        elif kind == "header_length":
            (real,) = struct.unpack("<Q", full[:8])
            expected.append(PASS if value == real else REFUSE)
            return struct.pack("<Q", value) + full[8:]
        elif kind == "truncate":
            expected.append(PASS if value >= len(full) else REFUSE)
            return full[:value]
        return pack(header, data)

    folder = variant(base, header_edit=header_edit)
    assert_verdict(validate(folder), expected[0], edit)


# the whole tool, on configs validation lets through with odd but valid values: every check passes
ODD_BUT_VALID = st.fixed_dictionaries({
    "max_position_embeddings": st.sampled_from([32, 100, 32768]),
    "rope_theta": st.sampled_from([1.0, 10000.0, 1e9]),
    "rms_norm_eps": st.sampled_from([1e-12, 1e-6, 0.5]),
})


def run_with_config(base: str, edits: dict):
    folder = variant(base, {**json.load(open(os.path.join(base, "config.json"))), **edits})
    try:
        return run_tool("--model-id", folder, "--device", "cpu", "--tp-size", "4", "--prompt", "The quick brown fox",
                        "--max-new-tokens", "4")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@settings(max_examples=2, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(edits=ODD_BUT_VALID)
@pytest.mark.engine
def test_odd_configs_through_the_whole_tool(base, edits):
    run = run_with_config(base, edits)
    assert run.returncode == 0, (edits, run.records[-2:], run.stderr[-2000:])
    assert run.phases()[-1] == "summary" and "error" not in run.phases()
    assert run.summary["ok"] and all(c["ok"] for c in run.summary["checks"].values())


@pytest.mark.engine
def test_a_context_too_short_for_the_prompt_is_bad_input(base):
    """max_position_embeddings below prompt + new tokens (counted with the checkpoint's tokenizer): exit 2
    before the engine starts, naming the context."""
    from transformers import AutoTokenizer

    prompt_tokens = len(AutoTokenizer.from_pretrained(base)("The quick brown fox")["input_ids"])
    run = run_with_config(base, {"max_position_embeddings": prompt_tokens + 4})  # needs one more: total < context
    assert run.returncode == 2, (run.records[-2:], run.stderr[-2000:])
    error = run.phase("error")
    assert error["stage"] == "arguments" and f"the model's context of {prompt_tokens + 4} tokens" in error["error"]
    assert "engine_ready_dummy" not in run.phases() and run.phases()[-1] == "summary"
