"""The sglang-jax adapter's capability probe, engine-free: each kind of need finds what a release lacks, and
the pinned release has everything (the other stacks: tests/test_compat.py)."""

import sys

import pytest

from param_swap import errors, flags, runner
from param_swap import sglang_adapter as adapter

FAKE = '''
import dataclasses

@dataclasses.dataclass
class Args:
    tp_size: int = 1

class Runner:
    def __init__(self):
        self.leaves, self.other = [], 0

    def load(self, model_config, mesh=None):
        if ep_size > 1:
            pass
'''


@pytest.fixture
def fake_module(tmp_path, monkeypatch):
    (tmp_path / "fake_sglang.py").write_text(FAKE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("fake_sglang", None)
    return "fake_sglang"


@pytest.mark.parametrize("name, need, missing", [
    ("Args", "fields:tp_size", []),
    ("Args", "fields:tp_size,disable_precompile", ["Args.disable_precompile"]),
    ("Runner.load", "call:model_config,mesh", []),
    ("Runner.load", "call:model_config,recv_req", ["fake_sglang.Runner.load(recv_req=...)"]),
    ("Runner", "sets:leaves,other", []),
    ("Runner", "sets:leaves,model_state_leaves", ["Runner.model_state_leaves (never set in fake_sglang)"]),
    ("Runner", "reads:ep_size", []),
    ("Runner", "reads:_dummy_mode", ["Runner never reads _dummy_mode"]),
    ("Runner.load", "lacks:if ep_size > 1:", ["Runner.load still has `if ep_size > 1:`"]),
    ("Runner.load", "lacks:if ep_size > 2:", []),
    ("Runner.absent", "", ["fake_sglang.Runner.absent"]),
])
def test_each_kind_of_need_finds_what_is_missing(fake_module, name, need, missing):
    assert adapter.missing_need(fake_module, name, need) == missing


def test_a_module_that_does_not_import_is_named_with_its_error(tmp_path, monkeypatch):
    (tmp_path / "broken_sglang.py").write_text("import qwix_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert adapter.missing_need("broken_sglang", "X", "") == [
        "broken_sglang does not import (ModuleNotFoundError: No module named 'qwix_not_installed')"]


def test_the_pinned_release_has_everything_and_is_named():
    adapter.probe_sglang.cache_clear()
    found = adapter.probe_sglang(("Qwen3MoeForCausalLM", "epmoe"))
    assert found["stack"] == "0.0.3rc99" and (found["sglang-jax"], found["jax"]) == adapter.SUPPORTED_STACKS["0.0.3rc99"]
    assert not [m for row in adapter.SGLANG_NEEDS for m in adapter.missing_need(*row)]


def test_a_missing_need_is_bad_input_naming_it_the_versions_and_the_stacks(monkeypatch):
    adapter.probe_sglang.cache_clear()
    monkeypatch.setattr(adapter, "SGLANG_NEEDS", adapter.SGLANG_NEEDS + [(adapter.SGL + "server_args", "ServerArgs",
                                                                   "fields:not_a_field")])
    with pytest.raises(errors.ToolError) as raised:
        adapter.probe_sglang()
    adapter.probe_sglang.cache_clear()
    e = raised.value
    assert e.exit_code == errors.EXIT_BAD_INPUT and e.stage == "sglang_jax" and e.details["missing"] == [
        "ServerArgs.not_a_field"]
    assert "sglang-jax 0.0.3rc99 (jax 0.8.1)" in e.error and all(s in e.hint for s in adapter.SUPPORTED_STACKS)


def test_every_engine_argument_the_tool_passes_is_probed():
    args = flags.parse_args(["--nnodes", "2", "--node-rank", "0", "--dist-init-addr", "127.0.0.1:1", "--tp-size", "2"])
    assert set(runner.engine_kwargs(args, "/m", "cpu", "dummy")) <= set(adapter.ENGINE_ARGS)


