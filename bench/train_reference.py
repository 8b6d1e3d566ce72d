#!/usr/bin/env python3
"""CPU QLoRA training reference: transformers + peft + bitsandbytes on the same model, texts and batch
shape that `qlorad train` uses in bench/run-train-cpu.sh.

  /work/venv/bin/python bench/train_reference.py --model models/smollm2 --data FILE.jsonl \
      [--steps 3] [--batch-size 2] [--max-seq-len 256] [--lora-r 16] [--gradient-checkpointing]

Model: BitsAndBytesConfig(load_in_4bit, nf4, double quant, compute dtype float32) on CPU; LoRA r/alpha
2r on all 7 projections (peft), torch AdamW lr 2e-4; loss = transformers' causal-LM loss over every
non-pad token. Data: the {"text"} lines of FILE in order, tokenized with the model folder's tokenizer
(no special tokens) + eos, truncated to --max-seq-len, batched in order and right-padded.
Measured: steps after the first (warm-up) one: tokens/s = non-pad tokens / wall time; peak RSS
(ru_maxrss). torch.set_num_threads(--threads, default os.cpu_count()). Prints one JSON object.
"""
import argparse
import json
import os
import resource
import sys
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--paged-optimizer", action="store_true",
                    help="bitsandbytes' PagedAdamW32bit (the QLoRA paper's optimizer) instead of torch AdamW")
    a = ap.parse_args()
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.model)
    texts = [json.loads(l)["text"] for l in open(a.data) if l.strip()]
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(a.model, quantization_config=bnb, dtype=torch.float32,
                                                 device_map="cpu")
    if a.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(
        r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if a.paged_optimizer:
        import bitsandbytes
        opt = bitsandbytes.optim.PagedAdamW32bit(params, lr=2e-4)
    else:
        opt = torch.optim.AdamW(params, lr=2e-4)
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    seqs = [(tok(t, add_special_tokens=False)["input_ids"] + [eos])[: a.max_seq_len] for t in texts]
    times, tokens, losses = [], [], []
    for step in range(a.steps + 1):
        batch = seqs[step * a.batch_size:(step + 1) * a.batch_size]
        n = max(len(s) for s in batch)
        ids = torch.tensor([s + [pad] * (n - len(s)) for s in batch])
        att = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in batch])
        labels = ids.masked_fill(att == 0, -100)
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=att, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        print(f"step {step}: loss {out.loss.item():.4f} {dt:.1f}s", file=sys.stderr)
        if step > 0:
            times.append(dt)
            tokens.append(int(att.sum()))
        losses.append(out.loss.item())
    print(json.dumps({
        "impl": "transformers+peft+bitsandbytes", "gradient_checkpointing": a.gradient_checkpointing,
        "paged_optimizer": a.paged_optimizer,
        "steps_timed": a.steps, "tokens": sum(tokens), "wall_s": round(sum(times), 2),
        "tokens_per_s": round(sum(tokens) / sum(times), 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "losses": losses, "threads": a.threads,
    }))


if __name__ == "__main__":
    main()
