"""The checkpoint: where it is, whether it is a family the tool swaps (config and every tensor validated
before anything starts), the MLLM-JAX params tree read from it on the host, and a tree written back as an HF
checkpoint (write_checkpoint)."""

import dataclasses
import json
import os
import re
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from param_swap import families, trees
from param_swap.errors import ToolError
from param_swap.families import FAMILIES, SUPPORTED_ARCHITECTURES, Family, Tensor


def resolve_checkpoint(model_id: str, download_dir: str | None) -> str:
    """Local folder as is; otherwise a hub snapshot (config, tokenizer, safetensors) into the HF cache."""
    if os.path.isdir(model_id):
        return os.path.abspath(model_id)
    if model_id.startswith((".", "/", "~")) or os.path.exists(model_id):
        raise ToolError("checkpoint", f"local checkpoint folder {model_id!r} does not exist",
                        "pass a folder with config.json and *.safetensors, or a hub id like Qwen/Qwen2.5-3B-Instruct")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model_id, cache_dir=download_dir,
                                 allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"])
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear error line
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or "connect" in str(e).lower() \
            or type(e).__name__ in ("LocalEntryNotFoundError", "ConnectionError", "ConnectTimeout")
        what = "the hub cannot be reached (offline) and the HF cache does not have it" if offline else "hub error"
        raise ToolError("checkpoint", f"cannot fetch {model_id!r}: {what}: {type(e).__name__}: {str(e)[:300]}",
                        "download it where the hub is reachable (huggingface-cli download ... --local-dir DIR) and "
                        "pass --model-id DIR, or check the id") from e


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    path: str
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    files: tuple[str, ...]
    context_len: int = 0  # max_position_embeddings: sglang-jax refuses prompt + new tokens beyond it
    biases: tuple[str, ...] = ("q", "k", "v")  # projections with a bias
    qk_norm: bool = False
    moe_layers: tuple[int, ...] = ()  # layers whose MLP is a router + experts (Qwen3-MoE)
    num_experts: int = 0
    moe_intermediate_size: int = 0


CONFIG_FIELDS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
                 "intermediate_size", "vocab_size", "max_position_embeddings")


def engine_view_of_config(path: str, raw: dict, family: Family) -> dict:
    """The sizes as the ENGINE sees them: config.json through transformers' AutoConfig, as sglang-jax reads
    it, with every default it fills in (a missing num_key_value_heads is 32 in Qwen2Config, not the number of
    attention heads). Bad or inconsistent values are exit 2, naming the field, before anything starts."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - transformers' own message names what is wrong
        raise ToolError("checkpoint", f"transformers cannot read {path}/config.json: {type(e).__name__}: {e}",
                        "fix config.json (sglang-jax reads it the same way)") from e
    values = {f: getattr(cfg, f, None) for f in CONFIG_FIELDS}
    head_dim = getattr(cfg, "head_dim", None)
    problems = [f"{f} = {v!r} (from config.json)" if f in raw else f"{f} = {v!r} (absent from config.json: "
                "the default transformers assumes)" for f, v in values.items()
                if not isinstance(v, int) or isinstance(v, bool) or v < 1]
    problems += [] if head_dim is None or (isinstance(head_dim, int) and head_dim > 0) else [f"head_dim = {head_dim!r}"]
    if not problems:
        heads, kv = values["num_attention_heads"], values["num_key_value_heads"]
        if heads % kv:
            why = "" if "num_key_value_heads" in raw else \
                " (config.json has no num_key_value_heads: transformers assumes " + str(kv) + ")"
            problems.append(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}{why}")
        if head_dim is None and values["hidden_size"] % heads:
            problems.append(f"hidden_size {values['hidden_size']} is not a multiple of num_attention_heads {heads} "
                            "(and config.json gives no head_dim)")
        if getattr(cfg, "mlp_bias", False):
            problems.append("mlp_bias is true: sglang-jax's model has no MLP biases")
    if problems:
        raise ToolError("checkpoint", f"config.json as the engine reads it: {'; '.join(problems)}",
                        "fix config.json: sglang-jax would fail inside its scheduler on these values")
    heads = values["num_attention_heads"]
    biases = ("q", "k", "v") if family.biases == "qkv" else ("q", "k", "v", "o") if getattr(
        cfg, "attention_bias", False) else ()
    moe = {}
    if family.moe:  # sglang-jax makes every layer sparse but config's mlp_only_layers (decoder_sparse_step unused)
        dense = set(getattr(cfg, "mlp_only_layers", None) or [])
        moe = dict(moe_layers=tuple(i for i in range(values["num_hidden_layers"]) if i not in dense),
                   num_experts=int(getattr(cfg, "num_experts", 0)),
                   moe_intermediate_size=int(getattr(cfg, "moe_intermediate_size", 0)))
        if moe["num_experts"] < 1 or moe["moe_intermediate_size"] < 1:
            raise ToolError("checkpoint", f"config.json: num_experts {moe['num_experts']}, moe_intermediate_size "
                            f"{moe['moe_intermediate_size']}", "a Qwen3-MoE config needs both positive")
    return dict(biases=biases, qk_norm=family.qk_norm, **moe,
                num_layers=values["num_hidden_layers"], num_heads=heads, num_kv_heads=values["num_key_value_heads"],
                head_dim=head_dim or values["hidden_size"] // heads, hidden_size=values["hidden_size"],
                intermediate_size=values["intermediate_size"], vocab_size=values["vocab_size"],
                tie_word_embeddings=bool(cfg.tie_word_embeddings), context_len=values["max_position_embeddings"])


def read_checkpoint_info(path: str) -> CheckpointInfo:
    config_file = os.path.join(path, "config.json")
    try:
        with open(config_file) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ToolError("checkpoint", f"cannot read {config_file}: {e}", "the folder needs a valid HF config.json") from e
    if not isinstance(cfg, dict):
        raise ToolError("checkpoint", f"{config_file} is not a JSON object", "the folder needs a valid HF config.json")
    archs = cfg.get("architectures")
    archs = archs if isinstance(archs, list) and archs else [cfg.get("model_type", "?")]
    if archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ToolError("checkpoint", f"architecture {archs[0]!r} is not supported",
                        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)} (Qwen2/Qwen2.5, Qwen3, Llama 2/3, Qwen3-MoE)")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = tuple(sorted(set(json.load(f)["weight_map"].values())))
    else:
        files = tuple(sorted(n for n in os.listdir(path) if n.endswith(".safetensors")))
    if not files:
        raise ToolError("checkpoint", f"no *.safetensors files in {path}", "the tool reads safetensors checkpoints")
    return CheckpointInfo(path=path, architecture=archs[0], files=files,
                          **engine_view_of_config(path, cfg, FAMILIES[archs[0]]))


def tensor_dims(info: CheckpointInfo) -> dict[str, int]:
    """The sizes TENSORS' shapes are written in."""
    return {"vocab": info.vocab_size, "hidden": info.hidden_size, "intermediate": info.intermediate_size,
            "q": info.num_heads * info.head_dim, "kv": info.num_kv_heads * info.head_dim, "head_dim": info.head_dim,
            "experts": info.num_experts, "moe_intermediate": info.moe_intermediate_size}


def tensor_inventory(info: CheckpointInfo) -> dict[str, tuple[Tensor, tuple[int, ...]]]:
    """{HF name: (its TENSORS row, its shape)} of every tensor the checkpoint must hold, in checkpoint order (a
    layer's experts expert by expert)."""
    dims = tensor_dims(info)
    holds = {"untied": not info.tie_word_embeddings, "qk_norm": info.qk_norm,
             **{f"{p}_bias": p in info.biases for p in "qkvo"}}

    def rows(layer: int | None) -> list[Tensor]:
        kept = [t for t in families.TENSORS if ("{i}" in t.hf) == (layer is not None) and holds.get(t.when, True)]
        moe = layer in info.moe_layers
        return [t for t in kept if not (t.when == "dense" and moe or t.when == "moe" and not moe)]

    out = {}
    for layer in [None, *range(info.num_layers)]:
        found = rows(layer)
        per_expert = [t for t in found if "{e}" in t.hf]
        for t in found:
            if "{e}" not in t.hf:
                out[t.hf.format(i=layer)] = (t, tuple(dims[d] for d in t.shape))
            elif t is per_expert[0]:  # a layer's experts: every projection of expert 0, then of expert 1, ...
                for e in range(info.num_experts):
                    out.update({r.hf.format(i=layer, e=e): (r, tuple(dims[d] for d in r.shape)) for r in per_expert})
    return out


def expected_tensors(info: CheckpointInfo) -> dict[str, tuple[int, ...]]:
    """{HF name: shape} of every tensor the checkpoint must hold."""
    return {name: shape for name, (_, shape) in tensor_inventory(info).items()}


HF_IGNORED = (r".*rotary_emb\.inv_freq",)  # buffers some exports carry; not parameters


def host_dtype(name: str):
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def safetensors_entry(name: str, meta, data: np.ndarray, data_start: int) -> np.ndarray:
    """One header entry as a zero-copy view of the mapped file, after checking every field of it: a float
    dtype, a shape of non-negative ints, offsets inside the file that span exactly shape x itemsize bytes."""
    if not isinstance(meta, dict):
        raise ValueError(f"{name}: header entry {meta!r:.60} is not an object")
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"{name}: dtype {str(dtype)[:20]} (floats only: {', '.join(SAFETENSORS_DTYPES)})")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise ValueError(f"{name}: shape {shape!r:.40} is not a list of non-negative ints")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and not isinstance(o, bool)
                                                                     for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"{name}: data_offsets {offsets!r:.40} are not [start, end] with 0 <= start <= end")
    start, end = (data_start + o for o in offsets)
    itemsize = host_dtype(SAFETENSORS_DTYPES[dtype]).itemsize
    if end - start != int(np.prod(shape)) * itemsize:
        raise ValueError(f"{name}: {end - start} bytes for shape {shape} of {dtype}")
    if end > data.size:
        raise ValueError(f"{name} ends at byte {end}, the file has {data.size}")
    return np.asarray(data[start:end]).view(host_dtype(SAFETENSORS_DTYPES[dtype])).reshape(shape)


def read_safetensors(info: CheckpointInfo) -> dict[str, np.ndarray]:
    """Every tensor of the shards as a zero-copy numpy view of the file (np.memmap: the OS reads pages
    lazily, when placement touches them; bf16 as ml_dtypes.bfloat16). safetensors' own numpy loader copies
    every tensor into new memory; its format (8-byte header length, JSON header, raw data) is simple enough
    to map directly. Used both to validate the checkpoint (shapes only) and to read it."""
    import struct

    tensors: dict[str, np.ndarray] = {}
    for fname in info.files:
        full = os.path.join(info.path, fname)
        try:
            with open(full, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > os.path.getsize(full) - 8:
                    raise ValueError(f"header length {header_len} exceeds the file: not a safetensors file")
                header = json.loads(f.read(header_len))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            data = np.memmap(full, dtype=np.uint8, mode="r")
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                tensors[name] = safetensors_entry(name, meta, data, 8 + header_len)
        except (OSError, ValueError, KeyError, struct.error) as e:
            raise ToolError("checkpoint", f"cannot read {fname}: {type(e).__name__}: {e}",
                            "the file is missing, truncated or corrupt, or not a float checkpoint") from e
    return tensors


def validate_checkpoint(info: CheckpointInfo) -> None:
    """Map the files (no data is read) and check every tensor against the config: present, inside its file
    (not truncated), the right shape, a float dtype. Runs before the engine is started."""
    found = {name: tuple(arr.shape) for name, arr in read_safetensors(info).items()}
    expected = expected_tensors(info)
    ignored = [n for n in found if any(re.fullmatch(rx, n) for rx in HF_IGNORED)
               or (n == "lm_head.weight" and info.tie_word_embeddings)]
    problems = [f"{n}: missing" for n in expected if n not in found]
    problems += [f"{n}: unexpected tensor" for n in found if n not in expected and n not in ignored]
    problems += [f"{n}: shape {found[n]}, config says {shape}" for n, shape in expected.items()
                 if n in found and found[n] != shape]
    if problems:
        raise ToolError("checkpoint", f"{len(problems)} tensor(s) do not match config.json: " + "; ".join(problems[:5]),
                        "the checkpoint's files and its config.json disagree: re-download or re-export it")


def to_numpy(t) -> np.ndarray:
    """numpy array of a numpy or torch tensor, without copies and without an fp16 detour for bf16."""
    if isinstance(t, np.ndarray):
        return t
    import ml_dtypes
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def hf_to_mllm(tensors: Mapping[str, Any], tie_word_embeddings: bool, dtype: str = "bfloat16") -> dict[str, np.ndarray]:
    """{HF name: numpy|torch tensor} -> flat MLLM-JAX tree {'model.layers_0.self_attn.q_proj.kernel': ndarray}.

    Kernels are transposed views (no copy); arrays are cast to `dtype` only where they differ; a layer's experts
    are stacked (one host copy). A tied checkpoint's lm_head (absent from its files, or present as an alias of
    the embedding) is dropped: the embedding is the head.
    """
    want = host_dtype(dtype)
    flat: dict[str, np.ndarray] = {}
    experts: dict[str, dict[int, np.ndarray]] = {}
    for name, tensor in tensors.items():
        if any(re.fullmatch(rx, name) for rx in HF_IGNORED) or (tie_word_embeddings and name == "lm_head.weight"):
            continue
        row, m = next(((t, m) for t in families.TENSORS if (m := families.name_pattern(t.hf).fullmatch(name))),
                      (None, None))
        if row is None:
            raise ToolError("checkpoint", f"unexpected tensor {name!r} in the checkpoint",
                            "this tool converts Qwen2, Qwen3, Qwen3-MoE and Llama checkpoints (embed, layers, "
                            "norm, lm_head)")
        arr = to_numpy(tensor)
        if "{e}" in row.hf:
            experts.setdefault(row.mllm.format(i=m["i"]), {})[int(m["e"])] = arr.T
            continue
        arr = arr if arr.dtype == want else arr.astype(want)
        flat[row.mllm.format(**m.groupdict())] = arr.T if row.transposed else arr
    for key, by_expert in experts.items():
        if sorted(by_expert) != list(range(len(by_expert))):
            raise ToolError("checkpoint", f"{key}: experts {sorted(by_expert)} are not 0..{len(by_expert) - 1}",
                            "every expert of a layer must be in the checkpoint")
        stacked = np.stack([by_expert[e] for e in range(len(by_expert))])
        flat[key] = stacked if stacked.dtype == want else stacked.astype(want)
    return flat


def read_torch_state_dict(info: CheckpointInfo) -> dict[str, Any]:
    """The reference run's path: transformers' model, then its state_dict (torch tensors)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(info.path, torch_dtype="auto", low_cpu_mem_usage=True)
    return dict(model.state_dict())


def read_mllm_tree(info: CheckpointInfo, source: str = "safetensors", dtype: str = "bfloat16") -> tuple[dict, float]:
    """The MLLM-JAX params tree of a checkpoint (read-only numpy leaves), and the seconds spent reading the files.
    source: safetensors (memory-mapped) or torch (transformers' state_dict)."""
    t = time.perf_counter()
    tensors = read_torch_state_dict(info) if source == "torch" else read_safetensors(info)
    read_s = time.perf_counter() - t
    flat = hf_to_mllm(tensors, info.tie_word_embeddings, dtype)
    for arr in flat.values():  # nobody changes it in place: the swapper may keep it as a free rollback (read_only)
        arr.flags.writeable = False
    return trees.nest(flat), read_s


def load_mllm_params(path: str, dtype: str = "bfloat16", source: str = "safetensors") -> dict:
    """API: the MLLM-JAX params tree (nested, read-only numpy leaves) of a local HF checkpoint folder, validated."""
    info = read_checkpoint_info(path)
    validate_checkpoint(info)
    return read_mllm_tree(info, source, dtype)[0]


def engine_dtype(dtype: str, info: CheckpointInfo) -> str:
    """The engine's dtype: `dtype`, or with auto the checkpoint's (config.json torch_dtype; newer: dtype)."""
    if dtype != "auto":
        return dtype
    with open(os.path.join(info.path, "config.json")) as f:
        raw = json.load(f)
    return str(raw.get("torch_dtype") or raw.get("dtype") or "float32")


def host_copy(arr) -> np.ndarray:
    """A device array on the host, whole (several hosts: gathered from every host's shards)."""
    if trees.on_devices(arr) and not arr.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(arr, tiled=True))
    return np.asarray(arr)


def write_checkpoint(flat: Mapping[str, Any], like: str, folder: str) -> str:
    """The MLLM-JAX tree (flat; host or device leaves) as an HF checkpoint in `folder`, every tensor named and
    laid out as TENSORS says (kernels transposed back, a layer's experts one tensor each), in the tree's dtype;
    config.json and the tokenizer copied from the checkpoint `like`. Loadable by transformers and sglang-jax."""
    import shutil

    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for key, value in flat.items():
        row, m = next(((t, m) for t in families.TENSORS if (m := families.name_pattern(t.mllm).fullmatch(key))),
                      (None, None))
        if row is None:
            raise ToolError("checkpoint", f"no HF name for the MLLM-JAX key {key!r}", "the tree has a tensor the "
                            "inventory (families.TENSORS) does not know")
        arr = host_copy(value)
        if "{e}" in row.hf:  # [expert, in, out] -> one [out, in] tensor per expert
            tensors.update({row.hf.format(i=m["i"], e=e): np.ascontiguousarray(arr[e].T) for e in range(len(arr))})
        else:
            tensors[row.hf.format(**m.groupdict())] = np.ascontiguousarray(arr.T if row.transposed else arr)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    for name in os.listdir(like):
        if not name.endswith(".safetensors") and name != "model.safetensors.index.json" and \
                os.path.isfile(os.path.join(like, name)):
            shutil.copy(os.path.join(like, name), os.path.join(folder, name))
    return folder
