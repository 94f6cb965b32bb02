"""The reports for people: the stderr table and --plot from phase records; --wandb never breaks a run."""

import argparse

import pytest

from param_swap import phases, report


def records():
    def rec(phase, elapsed, in_use, **extra):
        return {"phase": phase, "elapsed_s": elapsed, **extra,
                "memory": {"process_rss_bytes": 2**30, "jax_device_memory_summary": {"bytes_in_use_sum": in_use}}}

    return [rec("jax_ready", 0.1, 0), rec("engine_ready_dummy", 5.0, 1000, param_bytes_sum=800),
            rec("sglang_param_dict_ready", 6.0, 1800), rec("weights_swapped_from_mllm", 7.0, 1000),
            rec("swap_round", 8.0, 1000, round=1), {"phase": "summary", "elapsed_s": 9.0, "ok": False,
                                                    "checks": {"generate": {"ok": True}, "swap_effective": {"ok": False}}}]


def test_memory_table_marks_two_sets():
    table = report.memory_table(records())
    lines = table.splitlines()
    assert "device bytes in use (sum)" in lines[0] and len(lines) == 6
    assert "sglang_param_dict_ready" in lines[3] and "1.800x" in lines[3]
    assert "swap_round 1" in lines[5] and "1.000x" in lines[5]


def test_plot_is_written(tmp_path):
    path = tmp_path / "m.png"
    report.plot_memory(records(), str(path))
    assert path.read_bytes()[:4] == b"\x89PNG"


def args(**kw):
    return argparse.Namespace(wandb_project="p", **kw)


def test_wandb_init_failure_is_a_warning(monkeypatch, capsys):
    import wandb

    def broken_init(**kw):
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", broken_init)
    sink = report.WandbSink(args())
    assert sink.run is None
    sink.log(records()[1])  # a no-op, not an exception
    assert "W&B disabled" in capsys.readouterr().err


def test_wandb_log_failure_turns_the_sink_off(monkeypatch, capsys):
    import wandb

    class Run:
        def log(self, *a, **k):
            raise ConnectionError("network is unreachable")

    monkeypatch.setattr(wandb, "init", lambda **kw: Run())
    sink = report.WandbSink(args())
    sink.log(records()[1])
    assert sink.run is None and "W&B logging failed" in capsys.readouterr().err


@pytest.mark.parametrize("record", records())
def test_wandb_metrics_are_numbers(monkeypatch, record):
    import wandb

    logged = []

    class Run:
        def log(self, metrics, step):
            logged.append((step, metrics))

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kw: Run())
    sink = report.WandbSink(args())
    sink.log(record)
    # what must be logged, read from the record: its numbers (not its flags), the memory summary, the verdict
    expected = {f"{record['phase']}/{k}": v for k, v in record.items() if type(v) in (int, float)}
    if "memory" in record:
        expected.update({f"memory/{k}": v for k, v in record["memory"]["jax_device_memory_summary"].items()})
        expected["memory/process_rss_bytes"] = record["memory"]["process_rss_bytes"]
    if record["phase"] == "summary":
        expected.update({"summary/ok": 0, "checks/generate": 1, "checks/swap_effective": 0})
    assert logged == [(0, expected)] and expected
    assert all(type(v) in (int, float) for v in expected.values())


def test_phase_lines_are_strict_json():
    """NaN and infinities (a diverged model's logprobs) become null, named in nonfinite_fields, so that strict
    parsers accept every line; finite numpy floats stay numbers."""
    import json

    import numpy as np
    from conftest import strict_json

    record = {"phase": "logits_verified", "max": float("nan"), "ok": False, "rows": [1.5, float("-inf")],
              "worst": [{"margin": np.float32("nan"), "engine": np.float32(0.25)}], "n": 3}
    line = phases.strict_json(record)
    with pytest.raises(ValueError):
        strict_json(json.dumps(record, default=str))  # what json.dumps writes by default is refused
    assert strict_json(line) == {"phase": "logits_verified", "max": None, "ok": False, "rows": [1.5, None],
                                 "worst": [{"margin": None, "engine": 0.25}], "n": 3,
                                 "nonfinite_fields": {"max": "nan", "rows[1]": "-inf", "worst[0].margin": "nan"}}
    assert phases.strict_json({"phase": "x", "n": 1.0}) == '{"phase": "x", "n": 1.0}'  # nothing to name: no field
