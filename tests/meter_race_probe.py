"""A jitted step donating its sharded input in a loop on 4 virtual CPU devices, as the scheduler's forward
donates the KV cache while the engine serves, and memory walks in this thread meanwhile. Prints one JSON line:
how often a naive walk (read every live array's buffers) met an array donated mid-read, within 10 s at most,
and how many walks of the tool's meter ran, and failed, in 3 s. Usage: python tests/meter_race_probe.py"""

import json
import os
import threading
import time

os.environ.setdefault("USE_TORCH", "0")  # transformers without torch: nothing here needs it (6 s less)
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from param_swap import memory  # noqa: E402

sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(jax.devices(), ("tensor",)), jax.sharding.PartitionSpec("tensor"))
state = {"kv": jax.device_put(jnp.zeros((4096, 256), jnp.bfloat16), sharding)}
step = jax.jit(lambda kv: kv + 1, donate_argnums=0)
stop = threading.Event()


def serve() -> None:
    while not stop.is_set():
        state["kv"] = step(state["kv"])


def naive_walk() -> int:
    errors = 0
    for arr in jax.live_arrays():
        try:
            if not arr.is_deleted():
                memory.device_buffers(arr)
        except (RuntimeError, TypeError):  # deleted mid-read (see live_array_bytes_per_device)
            errors += 1
    return errors


def main() -> None:
    thread = threading.Thread(target=serve)
    thread.start()
    out = {"naive_walks": 0, "naive_errors": 0, "meter_walks": 0, "meter_errors": []}
    try:
        deadline = time.monotonic() + 10
        while not out["naive_errors"] and time.monotonic() < deadline:
            out["naive_errors"] += naive_walk()
            out["naive_walks"] += 1
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                memory.live_array_bytes_per_device()
            except Exception as e:  # noqa: BLE001 - every failure of the meter is what the test counts
                out["meter_errors"].append(f"{type(e).__name__}: {e}")
            out["meter_walks"] += 1
    finally:
        stop.set()
        thread.join()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
