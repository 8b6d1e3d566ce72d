#!/usr/bin/env python3
"""CPU inference benchmark reference: transformers (+ bitsandbytes NF4) on the same model and prompt
ids that `qlorad-bench` uses.  Driven by bench/run-cpu.sh; can be run alone.

  /work/venv/bin/python bench/cpu_reference.py --model models/smollm2 --quant none|nf4 \
      [--prompt-tokens 128] [--decode-tokens 64] [--repeats 3] [--threads 2] \
      [--prompt-file IDS.json | --dump-prompt IDS.json] [--dump-prompt-only]

Measurements (all on CPU, fp32 activations, torch.set_num_threads(--threads, default 2)):
  prefill_tok_s   P / t, t = median over R runs (after 1 warm-up) of one forward pass over the P prompt
                  tokens (use_cache=True, i.e. it also builds the KV cache, as a server's prefill does;
                  logits_to_keep=1: lm_head only for the last position, as generate() does).
  decode_tok_s    D / t, t = median over R runs (after 1 warm-up) of a manual greedy loop of D steps
                  `model(input_ids=last, past_key_values=cache)` after the prefill; every step is
                  timed separately (per-step median in decode_step_ms); the prefill is excluded.
                  EOS is ignored: always exactly D tokens.
  generate_tok_s  D / (t_generate - t_prefill): `model.generate(max_new_tokens=D, min_new_tokens=D,
                  do_sample=False)` wall time (median of R, after the warm-up) minus the median
                  prefill time, i.e. generate()'s decode rate including its per-step overheads;
                  generate_wall_s is the raw median wall time.
  load_s          wall time of from_pretrained (NF4: includes quantizing the weights with bitsandbytes).
  cpu_util_*      per measured run: process CPU seconds / wall seconds (about --threads on a quiet machine;
                  well below it means other processes took the cores and the timing is not trustworthy).
  rss_mb          peak RSS (getrusage ru_maxrss) at the end of the run; rss_load_mb right after loading;
                  rss_now_mb = current VmRSS at the end.

The prompt: ids of the first Guanaco text (../shared/data/guanaco-llama2-1k.parquet, column `text`;
further texts appended if it is shorter than P), tokenized by the model folder's tokenizer with
add_special_tokens=False and truncated to exactly P ids; if the parquet is absent, a fixed sentence
is repeated.  --dump-prompt writes those ids (JSON list) so the Rust bench can use identical ids;
--prompt-file reads ids from such a file instead (its length then defines P).

NF4: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True,
bnb_4bit_compute_dtype=torch.float32), device_map cpu.  TORCHDYNAMO_DISABLE=1 is set by default (bnb
wraps its generic torch quantizer in torch.compile; eager is bit-identical and avoids compiling
during load); export TORCHDYNAMO_DISABLE=0 to override.

Prints exactly one JSON object on stdout; progress goes to stderr.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PARQUET = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "guanaco-llama2-1k.parquet"))
FALLBACK_SENTENCE = ("The quick brown fox jumps over the lazy dog while the assistant explains, step by step, "
                     "how a transformer language model turns a prompt into the next token. ")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def peak_rss_mb():
    # Linux: ru_maxrss is in KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def build_prompt_ids(tok, n, parquet):
    source = None
    ids = []
    if parquet and os.path.exists(parquet):
        import pyarrow.parquet as pq
        texts = pq.read_table(parquet, columns=["text"]).column("text").to_pylist()
        i = 0
        while len(ids) < n and i < len(texts):
            ids += tok(texts[i], add_special_tokens=False)["input_ids"]
            i += 1
        source = f"guanaco texts[0..{i}) of {parquet}"
    if len(ids) < n:
        one = tok(FALLBACK_SENTENCE, add_special_tokens=False)["input_ids"]
        ids = []
        while len(ids) < n:
            ids += one
        source = "fallback sentence repeated: " + FALLBACK_SENTENCE.strip()
    return [int(x) for x in ids[:n]], source


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--quant", choices=["none", "nf4"], default="none")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parquet", default=DEFAULT_PARQUET)
    ap.add_argument("--prompt-file", help="read prompt ids (JSON list) from this file instead of building them")
    ap.add_argument("--dump-prompt", help="write the prompt ids used (JSON list) to this file")
    ap.add_argument("--dump-prompt-only", action="store_true",
                    help="only build/write the prompt ids (needs --dump-prompt), load no model")
    ap.add_argument("--no-generate", action="store_true", help="skip the generate() measurement")
    args = ap.parse_args()
    if args.repeats < 1 or args.decode_tokens < 1:
        ap.error("--repeats and --decode-tokens must be >= 1")

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)

    # ---- prompt ids ------------------------------------------------------------------------------
    if args.prompt_file:
        with open(args.prompt_file) as f:
            prompt = [int(x) for x in json.load(f)]
        source = f"file {args.prompt_file}"
        if not prompt:
            sys.exit("empty prompt file")
    else:
        tok = AutoTokenizer.from_pretrained(args.model)
        prompt, source = build_prompt_ids(tok, args.prompt_tokens, args.parquet)
    if args.dump_prompt:
        os.makedirs(os.path.dirname(os.path.abspath(args.dump_prompt)), exist_ok=True)
        with open(args.dump_prompt, "w") as f:
            json.dump(prompt, f)
        log(f"wrote {len(prompt)} prompt ids to {args.dump_prompt}")
    if args.dump_prompt_only:
        if not args.dump_prompt:
            ap.error("--dump-prompt-only needs --dump-prompt")
        print(json.dumps({"prompt_tokens": len(prompt), "prompt_source": source, "file": args.dump_prompt}))
        return
    P, D, R = len(prompt), args.decode_tokens, args.repeats

    # ---- load ------------------------------------------------------------------------------------
    kwargs = dict(dtype=torch.float32)
    if args.quant == "nf4":
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
        kwargs["device_map"] = {"": "cpu"}
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs).eval()
    load_s = time.perf_counter() - t0
    rss_load = peak_rss_mb()
    log(f"[{args.quant}] loaded {args.model} in {load_s:.2f}s, peak RSS {rss_load:.0f} MB, "
        f"attn={getattr(model.config, '_attn_implementation', '?')}")
    if args.quant == "nf4":
        import bitsandbytes as bnb
        n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        assert n4 > 0, "no Linear4bit modules: bitsandbytes quantization did not happen"

    from transformers import DynamicCache

    ids = torch.tensor([prompt], dtype=torch.long)

    # transformers >= 5.2x names the KV-cache argument `cache` (`past_key_values` is a deprecated alias);
    # the DynamicCache is updated in place, so one object is threaded through prefill and decode.
    import inspect
    fwd_params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in fwd_params else "past_key_values"
    # prefill needs only the last position's logits (as generate() and a server do): skip the lm_head for
    # the other P-1 positions where transformers supports it
    pre_kw = {"logits_to_keep": 1} if "logits_to_keep" in fwd_params else {}

    def prefill():
        cache = DynamicCache(config=model.config)
        t = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, **{cache_kw: cache}, **pre_kw)
        dt = time.perf_counter() - t
        return out, cache, dt

    def decode(out, cache):
        nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
        toks = [int(nxt)]
        steps = []
        for _ in range(D):
            t = time.perf_counter()
            o = model(input_ids=nxt, use_cache=True, **{cache_kw: cache})
            nxt = o.logits[:, -1, :].argmax(-1, keepdim=True)
            steps.append(time.perf_counter() - t)
            toks.append(int(nxt))
        assert cache.get_seq_length() == P + D, cache.get_seq_length()
        return steps, toks

    def cpu_s():
        t = os.times()
        return t.user + t.system

    prefill_times, decode_times, step_ms, util_pre, util_dec, util_gen = [], [], [], [], [], []
    tokens = None
    with torch.inference_mode():
        for r in range(R + 1):  # run 0 is the warm-up
            c0 = cpu_s()
            out, cache, dtp = prefill()
            c1 = cpu_s()
            steps, toks = decode(out, cache)
            c2 = cpu_s()
            del out, cache
            # process CPU seconds per wall second: ~threads when the cores are ours, less under contention
            up, ud = (c1 - c0) / dtp, (c2 - c1) / max(sum(steps), 1e-9)
            if r == 0:
                log(f"[{args.quant}] warm-up: prefill {dtp*1e3:.1f} ms, decode {sum(steps)*1e3:.1f} ms")
                tokens = toks
                continue
            if toks != tokens:
                log(f"[{args.quant}] WARNING: greedy tokens differ between runs")
            prefill_times.append(dtp)
            decode_times.append(sum(steps))
            util_pre.append(up)
            util_dec.append(ud)
            step_ms.extend(s * 1e3 for s in steps)
            log(f"[{args.quant}] run {r}: prefill {dtp*1e3:.1f} ms ({P/dtp:.1f} tok/s), "
                f"decode {sum(steps)*1e3:.1f} ms ({D/sum(steps):.1f} tok/s); cpu util {up:.2f}/{ud:.2f} of {args.threads}")

        gen_wall = None
        if not args.no_generate:
            mask = torch.ones_like(ids)
            gtimes = []
            for r in range(R + 1):
                c0 = cpu_s()
                t = time.perf_counter()
                g = model.generate(ids, attention_mask=mask, max_new_tokens=D, min_new_tokens=D,
                                   do_sample=False, pad_token_id=model.config.eos_token_id
                                   if isinstance(model.config.eos_token_id, int) else None)
                dt = time.perf_counter() - t
                assert g.shape[1] - P == D, g.shape
                if r > 0:
                    gtimes.append(dt)
                    util_gen.append((cpu_s() - c0) / dt)
            gen_wall = statistics.median(gtimes)

    t_pre = statistics.median(prefill_times)
    t_dec = statistics.median(decode_times)
    result = {
        "impl": "transformers",
        "quant": args.quant,
        "model": args.model,
        "prompt_tokens": P,
        "decode_tokens": D,
        "repeats": R,
        "threads": args.threads,
        "prefill_tok_s": P / t_pre,
        "decode_tok_s": D / t_dec,
        "generate_tok_s": (D / (gen_wall - t_pre)) if gen_wall and gen_wall > t_pre else None,
        "generate_wall_s": gen_wall,
        "prefill_s": prefill_times,
        "decode_s": decode_times,
        "decode_step_ms_median": statistics.median(step_ms),
        "cpu_util_prefill": util_pre,
        "cpu_util_decode": util_dec,
        "cpu_util_generate": util_gen,
        "loadavg_end": open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else None,
        "load_s": load_s,
        "rss_load_mb": rss_load,
        "rss_mb": peak_rss_mb(),
        "rss_now_mb": current_rss_mb(),
        "prompt_source": source,
        "greedy_ids_head": tokens[:16],
        "prefill_logits_to_keep": pre_kw.get("logits_to_keep"),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "bitsandbytes": None,
            "torch_num_threads": torch.get_num_threads(),
            "torchdynamo_disable": os.environ.get("TORCHDYNAMO_DISABLE"),
        },
    }
    try:
        import bitsandbytes
        result["versions"]["bitsandbytes"] = bitsandbytes.__version__
    except Exception:
        pass
    print(json.dumps(result))


if __name__ == "__main__":
    main()
