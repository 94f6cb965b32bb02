"""param_swap/generation.py without an engine: check_live, the refusal before a request is sent, on an engine
whose objects stand in as sglang-jax's (adapter's accessors) hold them."""

import types

import jax.numpy as jnp
import pytest

from param_swap import engine_state, generation
from param_swap.errors import ToolError


class Runner:  # hashable, as sglang-jax's ModelRunner is (engine_state.KV_FREED holds it weakly)
    def __init__(self, leaves: list, kv: list):
        self.model_state_leaves, self.token_to_kv_pool = leaves, types.SimpleNamespace(kv_buffer=kv)


def engine_with(kv: list, leaves: list):
    runner = Runner(leaves, kv)
    scheduler = types.SimpleNamespace(tp_worker=types.SimpleNamespace(worker=types.SimpleNamespace(model_runner=runner)))
    return types.SimpleNamespace(scheduler_info={"scheduler": scheduler}), runner


def deleted(x):
    x.delete()
    return x


def test_kv_buffers_a_forward_has_donated_are_not_a_released_engine():
    """A forward in flight has donated the KV buffers (deleted until the runner puts its outputs back): a
    generation asked meanwhile, under load, is not refused (it was, 1 run in 10 of two hosts serving on 0.1.0rc0)."""
    engine, _ = engine_with([deleted(jnp.zeros(4)), deleted(jnp.zeros(4))], [jnp.ones(2)])
    generation.check_live(engine)


def test_kv_freed_by_release_is_refused():
    engine, runner = engine_with([deleted(jnp.zeros(4)), deleted(jnp.zeros(4))], [jnp.ones(2)])
    engine_state.KV_FREED.add(runner)
    with pytest.raises(ToolError) as e:
        generation.check_live(engine)
    assert e.value.stage == "engine_released" and "2 KV buffers" in e.value.error
    engine_state.KV_FREED.discard(runner)
    generation.check_live(engine)


def test_a_donated_weight_is_refused():
    engine, _ = engine_with([jnp.zeros(4)], [jnp.ones(2), deleted(jnp.ones(2))])
    with pytest.raises(ToolError) as e:
        generation.check_live(engine)
    assert e.value.stage == "engine_weights_deleted" and "1 of the engine's 2" in e.value.error
