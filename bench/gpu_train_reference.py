#!/usr/bin/env python3
"""GPU QLoRA training reference (issue 6): transformers + peft + bitsandbytes on the model and batch
shape that `qlorad-bench gpu-train-bench` uses in bench/run-gpu-train.sh.

  python3 bench/gpu_train_reference.py --model /tmp/m7b [--gradient-checkpointing] [--json-out F]

Model: BitsAndBytesConfig(load_in_4bit, nf4, double quant, compute dtype bfloat16), dtype bfloat16, on
cuda:0; LoRA r=64 alpha=16 dropout 0 on all 7 projections (peft); bf16 autocast; bitsandbytes
PagedAdamW32bit lr 2e-4; clip 0.3; loss = transformers' causal-LM loss. Data: random token ids,
batch 4 x 512, every token a target (as the qlorad side). Gradient checkpointing: transformers'
gradient_checkpointing_enable (non-reentrant) + enable_input_require_grads.
Measured: --steps optimizer steps after --warmup untimed ones; tokens/s = batch*seq*steps / wall
(synchronized); peak = torch.cuda.max_memory_allocated (and _reserved) over the timed and warm-up
steps, model included. Prints one JSON object.
"""
import argparse
import json
import os
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--json-out")
    ap.add_argument("--curve", help="a loss curve instead: start from DIR/init (PEFT adapter), train "
                    "--steps plain steps over DIR/batches.json in turn, AdamW without weight decay, "
                    "as qlorad-bench gpu-train-bench --curve-steps did")
    a = ap.parse_args()
    import bitsandbytes as bnb
    import torch
    from qlora_reference import qlora_model

    init = os.path.join(a.curve, "init") if a.curve else None
    model, params = qlora_model(a.model, a.rank, a.alpha, a.gradient_checkpointing, init)
    # qlorad's AdamW has no weight decay by default; the curve compares like with like.
    opt = bnb.optim.PagedAdamW32bit(params, lr=2e-4, weight_decay=0.0 if a.curve else 0.01)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (a.batch, a.seq), device="cuda")
    torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    if a.curve:
        with open(os.path.join(a.curve, "batches.json")) as f:
            batches = [torch.tensor(b, device="cuda") for b in json.load(f)]
        losses = []
        for s in range(a.steps):
            ids = batches[s % len(batches)]
            losses.append(step())
        out = {"curve_losses": losses}
        print(json.dumps(out))
        if a.json_out:
            with open(a.json_out, "w") as f:
                json.dump(out, f, indent=1)
        return

    losses = [step() for _ in range(a.warmup)]
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(a.steps):
        losses.append(step())
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    key = "train_gc" if a.gradient_checkpointing else "train"
    out = {
        f"{key}_tok_s": a.batch * a.seq * a.steps / wall,
        f"{key}_peak_gb": torch.cuda.max_memory_allocated() / 1e9,
        f"{key}_peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9,
        f"{key}_losses": losses,
        "trainable_params": sum(p.numel() for p in params),
    }
    print(json.dumps(out))
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
