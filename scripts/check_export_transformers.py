#!/usr/bin/env python3
"""Recorded check: transformers loads the folders `qlorad merge` exports as plain models, and their
logits match peft's base + adapter (unmerged).

  cargo build --release -p qlorad
  /work/venv/bin/python scripts/check_export_transformers.py [QLORAD_BIN] [MODEL_DIR] [ADAPTER_DIR]
      (defaults target/release/qlorad, models/smollm2, tests/fixtures/lora/smollm2-r8-qv)

The adapter is copied with lora_alpha x8 (16 -> 128, scaling 16) so that it visibly changes the
model (the fixture's randn*0.02 weights barely move greedy decodes); the Rust test does the same.
Three exports are made with the qlorad binary into a temporary folder:
  E1  --dtype f32  --merge-into original
  E2  --dtype bf16 --merge-into original --max-shard-size 100MB   (several shards + index)
  E3  --dtype f32  --merge-into dequantized

Checks, each PASS/FAIL (exit status 1 if any FAIL), on the 4 prompts of tests/fixtures/smollm2/golden.json
(last-position logits; rel = max|diff| / max|ref|):
 1. E1 loads with plain from_pretrained (no missing/unexpected keys, lm_head tied, config dtype
    float32, no quantization_config); its tensors equal peft's merge_and_unload() of the same base +
    adapter (max |diff| <= 1e-6); logits vs peft unmerged: rel <= 1e-5, same argmax; a greedy 24-token
    chat decode of prompt b equals peft unmerged's.
 2. E2 loads in bfloat16 from its sharded index; every tensor is within one bf16 rounding of E1's
    (i.e. equals E1 rounded to nearest-even bf16); logits (bf16 compute) vs peft unmerged fp32:
    reported, with rel <= 5e-2.
 3. E3 vs transformers + bitsandbytes (nf4, double quant, compute f32) base + adapter, unmerged (the
    model a QLoRA adapter is trained against): rel <= 1e-3, same argmax. For contrast E1 vs it
    (the NF4 rounding error that `original` brings back) is printed.
 4. The tokenizer and chat template loaded from E1 render and encode prompt b as the base's.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, ".."))
QLORAD = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "release", "qlorad")
MODEL = sys.argv[2] if len(sys.argv) > 2 else os.path.join(ROOT, "models", "smollm2")
ADAPTER = sys.argv[3] if len(sys.argv) > 3 else os.path.join(ROOT, "tests", "fixtures", "lora", "smollm2-r8-qv")
ALPHA_BOOST = 8
NEW_TOKENS = 24

failures = []


def check(ok, msg):
    print(("PASS  " if ok else "FAIL  ") + msg)
    if not ok:
        failures.append(msg)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def last_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=2)
    return out[0, len(ids):].tolist()


def export(tmp, name, *args):
    out = os.path.join(tmp, name)
    cmd = [QLORAD, "merge", "--model", MODEL, "--adapter", os.path.join(tmp, "adapter"), "--out", out, *args]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    shown = " ".join(c.replace(tmp, "$TMP").replace(ROOT + os.sep, "") for c in cmd[1:])
    print(f"$ qlorad {shown}   ({time.time() - t0:.1f}s, exit {r.returncode})")
    print("  " + r.stderr.strip().replace(tmp, "$TMP"))
    if r.returncode != 0:
        check(False, f"qlorad merge {name} failed")
        sys.exit(1)
    return out


def main():
    import peft
    import transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    import bitsandbytes as bnb

    torch.set_num_threads(2)
    torch.manual_seed(0)
    print(f"versions: torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}, bitsandbytes {bnb.__version__}")
    with open(os.path.join(ROOT, "tests", "fixtures", "smollm2", "golden.json")) as f:
        prompts = json.load(f)["prompts"]
    tok = AutoTokenizer.from_pretrained(MODEL)
    ids = {k: tok(p, add_special_tokens=(k != "b"))["input_ids"] for k, p in prompts.items()}

    tmp = tempfile.mkdtemp(prefix="qlorad-export-check-")
    try:
        ad = os.path.join(tmp, "adapter")
        os.makedirs(ad)
        shutil.copy(os.path.join(ADAPTER, "adapter_model.safetensors"), ad)
        with open(os.path.join(ADAPTER, "adapter_config.json")) as f:
            acfg = json.load(f)
        acfg["lora_alpha"] = acfg["lora_alpha"] * ALPHA_BOOST
        with open(os.path.join(ad, "adapter_config.json"), "w") as f:
            json.dump(acfg, f)
        print(f"adapter: {os.path.relpath(ADAPTER, ROOT)} with lora_alpha x{ALPHA_BOOST} = {acfg['lora_alpha']} "
              f"(r {acfg['r']}, scaling {acfg['lora_alpha'] / acfg['r']:g}, targets {acfg['target_modules']})\n")
        e1 = export(tmp, "e1-f32", "--dtype", "f32")
        e2 = export(tmp, "e2-bf16", "--dtype", "bf16", "--max-shard-size", "100MB")
        e3 = export(tmp, "e3-deq-f32", "--dtype", "f32", "--merge-into", "dequantized")

        base = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
        ref_model = PeftModel.from_pretrained(base, ad).eval()
        ref = {k: last_logits(ref_model, v) for k, v in ids.items()}
        with ref_model.disable_adapter():
            plain = {k: last_logits(ref_model, v) for k, v in ids.items()}
        ref_greedy = greedy(ref_model, ids["b"], NEW_TOKENS)
        for k in ids:
            print(f"  (scale) prompt {k}: the adapter moves the logits by rel {rel(ref[k], plain[k]):.3e}")

        print("\n== 1. E1 (f32, original) in transformers vs peft base + adapter")
        m1, info = AutoModelForCausalLM.from_pretrained(e1, output_loading_info=True)
        m1.eval()
        for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
            v = info.get(key)
            check(not v, f"loading info {key}: {sorted(v)[:8] if v else 'none'}")
        with open(os.path.join(e1, "config.json")) as f:
            c1 = json.load(f)
        check(c1.get("dtype") == "float32" and "quantization_config" not in c1,
              f"config.json dtype {c1.get('dtype')!r}, quantization_config absent")
        check(m1.lm_head.weight.data_ptr() == m1.model.embed_tokens.weight.data_ptr(), "lm_head tied to embed_tokens")
        merged = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32), ad).merge_and_unload()
        sd_peft, sd_ours = merged.state_dict(), m1.state_dict()
        keys = sorted(k for k in sd_peft if k != "lm_head.weight")
        diff = max((sd_peft[k] - sd_ours[k]).abs().max().item() for k in keys)
        check(set(keys) <= set(sd_ours), f"every tensor of peft's merge_and_unload is in the export ({len(keys)})")
        check(diff <= 1e-6, f"tensors vs peft merge_and_unload: max |diff| {diff:.3e}")
        del merged, sd_peft
        for k in ids:
            out = last_logits(m1, ids[k])
            r = rel(out, ref[k])
            check(r <= 1e-5 and out.argmax() == ref[k].argmax(),
                  f"prompt {k}: rel {r:.3e} vs peft unmerged; argmax {out.argmax().item()} == {ref[k].argmax().item()}")
        g1 = greedy(m1, ids["b"], NEW_TOKENS)
        print(f"  export: {tok.decode(g1)!r}\n  peft:   {tok.decode(ref_greedy)!r}")
        check(g1 == ref_greedy, f"greedy {NEW_TOKENS}-token decode of prompt b equals peft unmerged's")

        print("\n== 2. E2 (bf16, original, sharded) in transformers")
        with open(os.path.join(e2, "model.safetensors.index.json")) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        print(f"  shards: {shards}")
        m2, info = AutoModelForCausalLM.from_pretrained(e2, output_loading_info=True)
        m2.eval()
        check(not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")),
              "loads from the index with no missing/unexpected keys")
        dts = {p.dtype for p in m2.parameters()}
        check(dts == {torch.bfloat16}, f"parameters load as {sorted(map(str, dts))} (config dtype bfloat16)")
        sd2 = m2.state_dict()
        bad = [k for k in sd2 if not torch.equal(sd2[k], sd_ours[k].to(torch.bfloat16))]
        check(not bad, f"every tensor equals E1 rounded to bf16 ({len(sd2) - len(bad)}/{len(sd2)})")
        for k in ids:
            out = last_logits(m2, ids[k])
            r = rel(out, ref[k])
            check(r <= 5e-2, f"prompt {k}: rel {r:.3e} vs peft unmerged fp32 (bf16 weights and compute); "
                             f"argmax {out.argmax().item()} vs {ref[k].argmax().item()}")
        del m2, sd2

        print("\n== 3. E3 (f32, dequantized) vs transformers + bitsandbytes NF4 base + adapter (unmerged)")
        qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
        qbase = AutoModelForCausalLM.from_pretrained(MODEL, quantization_config=qcfg, dtype=torch.float32)
        qref_model = PeftModel.from_pretrained(qbase, ad).eval()
        m3 = AutoModelForCausalLM.from_pretrained(e3).eval()
        for k in ids:
            qref = last_logits(qref_model, ids[k])
            out = last_logits(m3, ids[k])
            r = rel(out, qref)
            check(r <= 1e-3 and out.argmax() == qref.argmax(),
                  f"prompt {k}: rel {r:.3e} vs bnb NF4 + adapter; argmax {out.argmax().item()} == "
                  f"{qref.argmax().item()}   (E1 'original' vs it: {rel(last_logits(m1, ids[k]), qref):.3e})")

        print("\n== 4. tokenizer and chat template of E1")
        t1 = AutoTokenizer.from_pretrained(e1)
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        r0 = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        r1 = t1.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        check(r1 == r0 == prompts["b"], "chat template renders prompt b as the base's")
        check(t1(r1, add_special_tokens=False)["input_ids"] == ids["b"], "tokenizer encodes prompt b as the base's")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print("\nRESULT: " + ("PASS (transformers loads the exports; merged weights and logits match peft)"
                          if not failures else f"FAIL ({len(failures)} checks)"))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
