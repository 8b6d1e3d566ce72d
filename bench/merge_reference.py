#!/usr/bin/env python3
"""Reference promotion flow for bench/merge-rss.sh: what a transformers + peft user runs to merge an
adapter and export a bf16 model (load the fp32 base, apply the adapter, merge_and_unload, cast to
bf16, save_pretrained with 5 GB shards).

  python bench/merge_reference.py MODEL_DIR ADAPTER_DIR OUT_DIR
"""
import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(2)
model_dir, adapter_dir, out = sys.argv[1:4]
base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
merged.to(torch.bfloat16).save_pretrained(out, max_shard_size="5GB")
AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
