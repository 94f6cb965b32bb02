"""The demo checkpoint: a tiny random model of one family, its tensors derived from the inventory (TENSORS),
with a tokenizer trained on the spot."""

import json
import os

import numpy as np

from param_swap import checkpoint
from param_swap.checkpoint import CheckpointInfo
from param_swap.families import family_of_arch

DEMO_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Explain what a parameter hot-swap is in one sentence.",
    "Reinforcement learning trainers update weights; rollout engines generate with them.",
    "JAX arrays are sharded over devices; every device holds a shard or a replica.",
]


# Qwen's ChatML, for --chat on the demo checkpoint (its tokenizer knows no special tokens but EOS: plain text)
DEMO_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                      "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tokenizer(folder: str, vocab_size: int, chat_template: bool = True) -> int:
    """A byte-level BPE trained on the spot; returns the EOS id. EOS is the LAST id, not 0 (the tool
    generates with ignore_eos, so an early EOS would not shorten an answer, but the demo reads better)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(DEMO_CORPUS * 20, trainer)
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>", "model_max_length": 4096,
                   **({"chat_template": DEMO_CHAT_TEMPLATE} if chat_template else {})}, f)
    return tok.token_to_id("<|endoftext|>")


def write_demo_checkpoint(folder: str, *, tied: bool = True, num_kv_heads: int = 2, num_heads: int = 4,
                          head_dim: int = 128, hidden_size: int = 512, intermediate_size: int = 1024,
                          num_layers: int = 2, vocab_size: int = 512, dtype: str = "bfloat16",
                          num_shards: int = 1, seed: int = 0, chat_template: bool = True, arch: str = "qwen2",
                          attention_bias: bool = False) -> str:
    """A random-weight checkpoint of the family `arch` (qwen2, qwen3, llama, qwen3_moe) in HF layout (config,
    tokenizer, safetensors): the tensors TENSORS says such a config holds, in its order. head_dim 128: the CPU
    attention path needs it. Returns the folder."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    eos = write_tokenizer(folder, vocab_size, chat_template)
    family = family_of_arch(arch)
    config = {
        "architectures": [family.architecture], "model_type": family.model_type, "vocab_size": vocab_size,
        "hidden_size": hidden_size, "intermediate_size": intermediate_size, "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads, "head_dim": head_dim,
        "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "tie_word_embeddings": tied, "torch_dtype": dtype, "bos_token_id": eos, "eos_token_id": eos,
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": num_layers,
    }
    if family.biases == "attention_bias":
        config["attention_bias"] = attention_bias
    if family.demo_config:
        config.update(family.demo_config(config))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    dense = set(config.get("mlp_only_layers", []))
    info = CheckpointInfo(
        path=folder, architecture=family.architecture, num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, hidden_size=hidden_size, intermediate_size=intermediate_size,
        vocab_size=vocab_size, tie_word_embeddings=tied, files=(), context_len=config["max_position_embeddings"],
        biases=("q", "k", "v") if family.biases == "qkv" else ("q", "k", "v", "o") if attention_bias else (),
        qk_norm=family.qk_norm, moe_layers=tuple(i for i in range(num_layers) if i not in dense) if family.moe else (),
        num_experts=config.get("num_experts", 0), moe_intermediate_size=config.get("moe_intermediate_size", 0))
    rng = np.random.default_rng(seed)
    out_dtype = checkpoint.host_dtype(dtype)
    tensors = {name: (row.init[0] + row.init[1] * rng.standard_normal(shape, dtype=np.float32)).astype(out_dtype)
               for name, (row, shape) in checkpoint.tensor_inventory(info).items()}
    if num_shards == 1:
        save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return folder
    names, weight_map = list(tensors), {}
    for s in range(num_shards):
        fname = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::num_shards]}
        save_file(part, os.path.join(folder, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}, f)
    return folder
