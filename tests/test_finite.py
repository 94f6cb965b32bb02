"""The NaN/Inf check's screen (param_swap/finite.py) finds every NaN and infinity and nothing else, in host arrays
and in the devices' own buffers read in place, whatever the piece and chunk boundaries; what it cannot read in
place is left to the count on the devices. Engine-free."""

import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from conftest import ROOT, clean_env

from param_swap import finite

DTYPES = [ml_dtypes.bfloat16, np.float16, np.float32, np.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_position_of_every_nonfinite_value_is_found(dtype, monkeypatch):
    monkeypatch.setattr(finite, "PIECE_BYTES", 64)  # many pieces and chunks: their boundaries are exercised
    monkeypatch.setattr(finite, "CHUNK_WORDS", 3)
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 5, 7, 8, 13, 33, 101):
        for pos in range(n):
            for value in (np.nan, np.inf, -np.inf):
                a = rng.standard_normal(n).astype(dtype)
                a[pos] = value
                assert finite.screen({"w": a}).result() == {"w"}, (n, pos, value)
        edge = rng.standard_normal(n).astype(dtype)
        info = ml_dtypes.finfo(dtype)
        edge[0], edge[-1] = info.max, -info.max  # the largest finite values: every exponent bit but one set
        if n > 2:
            edge[1] = info.smallest_subnormal
        assert finite.screen({"w": edge}).result() == set(), n


def test_only_the_arrays_that_hold_one_are_named_and_other_dtypes_go_to_the_device_count():
    clean, bad = np.ones(1000, np.float32), np.ones(1000, ml_dtypes.bfloat16)
    bad[999] = np.nan
    ints = np.arange(10, dtype=np.int32)
    fp8 = np.ones(16, ml_dtypes.float8_e4m3fn)
    found = finite.screen({"clean": clean, "bad": bad, "ints": ints, "fp8": fp8}).result()
    assert found == {"bad", "ints", "fp8"}  # ints and fp8: not read in place, counted exactly instead
    assert finite.nonfinite_counts({"bad": bad, "ints": ints, "fp8": fp8}) == {"bad": 1}


SHARDED = """
import json
import jax, ml_dtypes, numpy as np
from jax._src.array import ArrayImpl
from param_swap import finite
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("tp",))
P = jax.sharding.PartitionSpec
out = {}
reads = []
value = ArrayImpl._value
ArrayImpl._value = property(lambda self: reads.append(self.nbytes) or value.fget(self))
for name, spec in (("rows", P("tp", None)), ("cols", P(None, "tp")), ("replicated", P())):
    host = np.ones((64, 32), ml_dtypes.bfloat16)
    clean = jax.device_put(host, jax.sharding.NamedSharding(mesh, spec))
    host[63, 31] = np.inf  # the last element: the last device's shard, its last bytes
    bad = jax.device_put(host, jax.sharding.NamedSharding(mesh, spec))
    out[name] = sorted(finite.screen({"clean": clean, "bad": bad}).result())
out["screen_reads"] = len(reads)  # read in place: no device->host copy
out["counts"] = finite.nonfinite_counts({"bad": bad})
print(json.dumps(out))
"""


def test_device_shards_are_read_in_place_on_cpu():
    """4 CPU devices: a value in any device's shard is found, in every sharding, with no device->host read; the
    exact count then counts a replicated shard once."""
    env = {**clean_env(), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    proc = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["rows"] == out["cols"] == out["replicated"] == ["bad"]
    assert out["screen_reads"] == 0 and out["counts"] == {"bad": 1}


def test_a_screen_closed_early_leaves_no_thread_reading(monkeypatch):
    """close() (a swap that failed before waiting on its check) cancels what has not started and waits for what
    has: no thread reads a buffer the caller may then delete."""
    monkeypatch.setattr(finite, "PIECE_BYTES", 1 << 12)
    started = finite.screen({"w": np.ones(1 << 22, np.float32)})  # 4096 pieces
    started.close()
    assert all(piece.done() for _, piece in started.pieces)
    assert any(piece.cancelled() for _, piece in started.pieces)
