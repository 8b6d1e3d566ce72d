#!/usr/bin/env python3
"""The Python reference for bench/run-gpu.sh: transformers + peft + bitsandbytes on the same model
folder and adapter as `qlorad-bench gpu-bench`, with the same figures and JSON keys.

NF4 + double quantization, bf16 compute (BitsAndBytesConfig as QLoRA configures it); greedy decode
with a manual KV-cache loop that reads each step's token back to the host (as a server must, and as
qlorad does); the same synthetic prompt ids; warm-up first; medians of --repeats; CUDA-synchronised
host timers.

    PYTHONPATH=<dir with bitsandbytes> python3 bench/gpu_reference.py --model M --adapter A
"""
import argparse
import json
import statistics
import time

import torch


def synthetic_prompt(n, vocab):
    # Same ids as qlorad-bench's synthetic_prompt.
    return [(100 + (i * 7919) % 20000) % vocab for i in range(n)]


def decode_tok_s(model, prompt, n):
    dev = model.device
    with torch.inference_mode():
        ids = torch.tensor([prompt], device=dev)
        out = model(input_ids=ids, use_cache=True)
        past = out.past_key_values
        nxt = int(out.logits[0, -1].argmax())
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            out = model(input_ids=torch.tensor([[nxt]], device=dev), past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = int(out.logits[0, -1].argmax())
        return n / (time.perf_counter() - t)


def ttft_s(model, prompt):
    with torch.inference_mode():
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model(input_ids=torch.tensor([prompt], device=model.device), use_cache=True)
        int(out.logits[0, -1].argmax())
        return time.perf_counter() - t


def batch_tok_s(model, batch, prompt_len, steps, vocab):
    dev = model.device
    with torch.inference_mode():
        ids = torch.tensor([synthetic_prompt(prompt_len + i, vocab)[i:] for i in range(batch)], device=dev)
        out = model(input_ids=ids, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        nxt.cpu()
        t = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            nxt.cpu()
        return batch * steps / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--ttft-tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batch-steps", type=int, default=16)
    ap.add_argument("--json-out")
    a = ap.parse_args()

    import bitsandbytes
    import peft
    import transformers
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    torch.cuda.synchronize()
    m0 = torch.cuda.memory_allocated()
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        a.model, quantization_config=q, dtype=torch.bfloat16, device_map={"": 0}
    )
    model.eval()
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t
    base_gb = (torch.cuda.memory_allocated() - m0) / 1e9
    footprint_gb = model.get_memory_footprint() / 1e9
    print(f"reference: loaded in {load_s:.1f}s, GPU memory of the base {base_gb:.2f} GB (footprint {footprint_gb:.2f} GB)")
    vocab = model.config.vocab_size
    prompt = synthetic_prompt(a.prompt_tokens, vocab)
    long = synthetic_prompt(a.ttft_tokens, vocab)
    ttft_s(model, long)
    decode_tok_s(model, prompt[:8], 4)
    dec = [decode_tok_s(model, prompt, a.decode_tokens) for _ in range(a.repeats)]
    print(f"reference decode batch 1, base: {statistics.median(dec):.1f} tok/s {dec}")
    tt = [ttft_s(model, long) for _ in range(a.repeats)]
    print(f"reference TTFT {len(long)} tokens: {statistics.median(tt) * 1e3:.1f} ms")
    out = {
        "impl": "transformers+peft+bitsandbytes",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__,
        },
        "decode_tokens": a.decode_tokens,
        "decode_b1_tok_s": statistics.median(dec),
        "decode_b1_runs": dec,
        "ttft_1k_ms": statistics.median(tt) * 1e3,
        "prefill_tok_s": len(long) / statistics.median(tt),
        "base_gpu_gb": base_gb,
        "base_footprint_gb": footprint_gb,
        "load_s": load_s,
        "decode_b1_adapter_tok_s": None,
        "adapter_load_ms": None,
        "multi_adapter_32_ratio": None,
    }
    if a.batch > 0:
        batch_tok_s(model, 2, 16, 2, vocab)
        agg = batch_tok_s(model, a.batch, 32, a.batch_steps, vocab)
        print(f"reference decode batch {a.batch}, base: {agg:.1f} tok/s aggregate")
        out[f"decode_b{a.batch}_tok_s"] = agg
    if a.adapter:
        from peft import PeftModel

        torch.cuda.synchronize()
        t = time.perf_counter()
        pm = PeftModel.from_pretrained(model, a.adapter)
        pm.eval()
        torch.cuda.synchronize()
        load_ms = (time.perf_counter() - t) * 1e3
        print(f"reference adapter load: {load_ms:.1f} ms")
        decode_tok_s(pm, prompt[:8], 4)
        dec = [decode_tok_s(pm, prompt, a.decode_tokens) for _ in range(a.repeats)]
        print(f"reference decode batch 1, one r=64 adapter: {statistics.median(dec):.1f} tok/s {dec}")
        out["adapter_load_ms"] = load_ms
        out["decode_b1_adapter_tok_s"] = statistics.median(dec)
        out["decode_b1_adapter_runs"] = dec
    print(json.dumps(out))
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
