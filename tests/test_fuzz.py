"""Property-based fuzzing of the inputs (hypothesis): config.json fields and safetensors headers.

Validation level (in process, no engine, many cases): every case passes or raises ToolError with exit code 2,
never another exception. Whole-tool level (a few cases, subprocesses): a config that validation lets through
with odd values runs the tool to the end: exit 0, 2 or 3, one error line and the summary on failure, never
137, never a traceback on stdout.
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

import run_param_swap as rps

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


def validate(folder: str) -> None:
    """Everything the tool checks before JAX or the engine start: passes, or ToolError with exit 2."""
    try:
        info = rps.read_checkpoint_info(folder)
        rps.validate_checkpoint(info)
        rps.validate_parallelism(info, 4)
    except rps.ToolError as e:
        assert e.exit_code == 2, e.record()
        assert e.record()["error"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@SETTINGS
@given(edits=st.dictionaries(st.sampled_from(FIELDS), VALUES, min_size=1, max_size=3))
def test_config_fields(base, edits):
    config = json.load(open(os.path.join(base, "config.json")))
    for field, value in edits.items():
        if value is MISSING:
            config.pop(field, None)
        else:
            config[field] = value
    validate(variant(base, config))


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

    def header_edit(header: dict, data: bytes) -> bytes:
        names = sorted(k for k in header if k != "__metadata__")
        name = names[which % len(names)]
        if kind == "offsets":
            header[name]["data_offsets"] = value
        elif kind in ("dtype", "shape"):
            header[name][kind] = value
        elif kind == "rename":
            header[value] = header.pop(name)
        elif kind == "drop":
            header.pop(name)
        elif kind == "not_a_dict":
            header[name] = value
        elif kind == "header_length":
            blob = pack(header, data)
            return struct.pack("<Q", value) + blob[8:]
        elif kind == "truncate":
            return pack(header, data)[:value]
        return pack(header, data)

    validate(variant(base, header_edit=header_edit))


# the whole tool, on configs validation lets through: exit 0, 2 or 3, never 137, never a traceback on stdout
ODD_BUT_VALID = st.fixed_dictionaries({
    "max_position_embeddings": st.sampled_from([16, 100, 32768]),
    "rope_theta": st.sampled_from([1.0, 10000.0, 1e9]),
    "rms_norm_eps": st.sampled_from([1e-12, 1e-6, 0.5]),
})


@settings(max_examples=2, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(edits=ODD_BUT_VALID)
@pytest.mark.engine
def test_odd_configs_through_the_whole_tool(base, edits):
    config = {**json.load(open(os.path.join(base, "config.json"))), **edits}
    folder = variant(base, config)
    try:
        run = run_tool("--model-id", folder, "--device", "cpu", "--tp-size", "4", "--prompt", "The quick brown fox",
                       "--max-new-tokens", "4")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert run.returncode in (0, 1, 2, 3), (run.returncode, run.stderr[-2000:])
    assert "Traceback" not in run.stdout and run.records[-1]["phase"] == "summary"
    errors = [r for r in run.records if r["phase"] == "error"]
    assert len(errors) == (run.returncode in (2, 3)), run.records[-2:]
