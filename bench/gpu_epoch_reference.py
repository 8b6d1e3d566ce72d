#!/usr/bin/env python3
"""One epoch of QLoRA training with transformers + peft + bitsandbytes on exactly the batches qlorad
trained on (issue 6's Guanaco epoch figure), from the plan `qlorad train --dump-plan` wrote.

  python3 bench/gpu_epoch_reference.py --model M --plan plan.jsonl [--rank 16 --alpha 32] [--json-out F]

The plan holds, per optimizer step, the learning rate qlorad used and each micro-batch's token ids
and loss masks (qlorad's tokenization, chat handling and length-grouped order). This script pads
each micro-batch on the right with the plan's pad id (attention mask 0 there), sets labels to -100
where the loss mask is off (transformers' causal-LM loss then averages over the same targets),
and runs the QLoRA recipe: BitsAndBytesConfig(nf4, double quant, bf16 compute), peft LoRA (rank,
alpha, dropout 0, all 7 projections), bf16 autocast, PagedAdamW32bit without weight decay at the
plan's learning rates, gradient clipping 0.3, micro-batch losses averaged over the accumulation
group. Measures the epoch's wall time (synchronized, model load excluded) and
torch.cuda.max_memory_allocated; prints one JSON object.
"""
import argparse
import json
import os
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--plan", required=True)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--clip", type=float, default=0.3)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--json-out")
    a = ap.parse_args()
    import bitsandbytes as bnb
    import torch
    from qlora_reference import qlora_model

    with open(a.plan) as f:
        plan = [json.loads(line) for line in f if line.strip()]
    model, params = qlora_model(a.model, a.rank, a.alpha, a.gradient_checkpointing)
    opt = bnb.optim.PagedAdamW32bit(params, lr=plan[0]["lr"] if plan else 2e-4, weight_decay=0.0)

    def tensors(mb, pad):
        n = max(len(x) for x in mb["input_ids"])
        ids, att, lab = [], [], []
        for x, m in zip(mb["input_ids"], mb["loss_mask"]):
            k = n - len(x)
            ids.append(x + [pad] * k)
            att.append([1] * len(x) + [0] * k)
            lab.append([t if keep else -100 for t, keep in zip(x, m)] + [-100] * k)
        dev = "cuda"
        return (torch.tensor(ids, device=dev), torch.tensor(att, device=dev),
                torch.tensor(lab, device=dev))

    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    losses, tokens = [], 0
    for s in plan:
        for g in opt.param_groups:
            g["lr"] = s["lr"]
        total = 0.0
        for mb in s["micro"]:
            ids, att, lab = tensors(mb, s["pad_id"])
            tokens += int(att.sum())
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(input_ids=ids, attention_mask=att, labels=lab)
            (out.loss / len(s["micro"])).backward()
            total += out.loss.item() / len(s["micro"])
        if a.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, a.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    out = {
        "epoch_s": wall,
        "epoch_steps": len(plan),
        "epoch_tokens": tokens,
        "epoch_tok_s": tokens / wall,
        "epoch_peak_gb": torch.cuda.max_memory_allocated() / 1e9,
        "epoch_peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9,
        "epoch_losses": losses,
    }
    print(json.dumps({k: v for k, v in out.items() if k != "epoch_losses"}))
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
