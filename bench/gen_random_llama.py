#!/usr/bin/env python3
"""Writes a random-weight Llama/Mistral model folder (config.json + bf16 safetensors) for GPU
benchmarks: performance does not depend on the weight values (../shared/MODELS.md), and no hub is
reachable from the GPU machine. Weights are drawn on the GPU (fast), N(0, std^2) like HF's init;
norms are ones. Defaults: Mistral-7B shapes (v0.2 style: rope_theta 1e6, no sliding window).

    python3 bench/gen_random_llama.py --out /tmp/m7b
"""
import argparse
import json
import os
import time

import torch
from safetensors.torch import save_file


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rope-theta", type=float, default=1e6)
    ap.add_argument("--max-pos", type=int, default=32768)
    ap.add_argument("--std", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if os.path.exists(os.path.join(a.out, "config.json")):
        print(f"{a.out} exists; keeping it")
        return
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    torch.manual_seed(a.seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hd = a.hidden // a.heads
    cfg = {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_size": a.hidden,
        "intermediate_size": a.intermediate,
        "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "head_dim": hd,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": a.rope_theta,
        "max_position_embeddings": a.max_pos,
        "sliding_window": None,
        "vocab_size": a.vocab,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
        "initializer_range": a.std,
    }
    shapes = {
        "self_attn.q_proj": (a.heads * hd, a.hidden),
        "self_attn.k_proj": (a.kv_heads * hd, a.hidden),
        "self_attn.v_proj": (a.kv_heads * hd, a.hidden),
        "self_attn.o_proj": (a.hidden, a.heads * hd),
        "mlp.gate_proj": (a.intermediate, a.hidden),
        "mlp.up_proj": (a.intermediate, a.hidden),
        "mlp.down_proj": (a.hidden, a.intermediate),
    }

    def rnd(shape):
        return (torch.randn(shape, device=dev, dtype=torch.float32) * a.std).to(torch.bfloat16).cpu()

    ones = torch.ones(a.hidden, dtype=torch.bfloat16)
    # One shard per 8 layers keeps host memory and single-file sizes moderate.
    index = {}
    shard = {}
    n_shards = (a.layers + 7) // 8 + 1
    files = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]

    def flush(i):
        save_file(shard, os.path.join(a.out, files[i]), metadata={"format": "pt"})
        for k in shard:
            index[k] = files[i]
        shard.clear()

    for layer in range(a.layers):
        p = f"model.layers.{layer}"
        for name, shape in shapes.items():
            shard[f"{p}.{name}.weight"] = rnd(shape)
        shard[f"{p}.input_layernorm.weight"] = ones.clone()
        shard[f"{p}.post_attention_layernorm.weight"] = ones.clone()
        if layer % 8 == 7 or layer == a.layers - 1:
            flush(layer // 8)
    shard["model.embed_tokens.weight"] = rnd((a.vocab, a.hidden))
    shard["model.norm.weight"] = ones.clone()
    shard["lm_head.weight"] = rnd((a.vocab, a.hidden))
    flush(n_shards - 1)
    with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": index}, f)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    print(f"wrote {a.out} ({len(index)} tensors) in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
