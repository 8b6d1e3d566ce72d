#!/usr/bin/env python3
"""Carries a small NF4 model folder to the GPU machine under the device tool's 64 MiB per call.

SmolLM2-135M as `qlorad quantize` writes it is 169 MB, 113 MB of which is its f32 (tied) token
embedding. `pack` (standard library only, runs on the build machine) stores that embedding as NF4
too (blocksize 64, f32 absmax, the same nearest-code rule as qlorad's quantizer), keeps every other
tensor as it is, and cuts the result into parts of at most --part-mb; `unpack` (numpy + safetensors,
on the GPU machine) joins the parts and writes a model folder whose embedding is the NF4-dequantized
f32 values. Both backends of the GPU-vs-CPU check then load the same weights: this is SmolLM2 with
an NF4 embedding, not the original one.

    python3 bench/device_pack.py pack /tmp/smol-nf4 .devbuild/smol --part-mb 36
    python3 bench/device_pack.py unpack PART0 PART1 ... --out /tmp/smollm2-nf4
"""
import argparse
import bisect
import io
import json
import os
import struct
import sys
import tarfile
from array import array

NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
       0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
       0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
EMBED = "model.embed_tokens.weight"


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    return header, data


def write_safetensors(path, tensors):
    """tensors: name -> (dtype, shape, bytes)."""
    header, off = {}, 0
    for k, (dt, shape, b) in tensors.items():
        header[k] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(b)]}
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for _, _, b in tensors.values():
            f.write(b)


def pack(a):
    st = os.path.join(a.src, "model.safetensors")
    header, data = read_safetensors(st)
    meta = header.pop("__metadata__", None)
    rest = {}
    for k, v in header.items():
        o0, o1 = v["data_offsets"]
        if k != EMBED:
            rest[k] = (v["dtype"], v["shape"], data[o0:o1])
    e = header[EMBED]
    assert e["dtype"] == "F32", e["dtype"]
    vals = array("f")
    vals.frombytes(data[e["data_offsets"][0]:e["data_offsets"][1]])
    bounds = [(NF4[i] + NF4[i + 1]) / 2 for i in range(15)]
    bs = 64
    absmax = array("f")
    codes = bytearray(len(vals) // 2)
    for b0 in range(0, len(vals), bs):
        blk = vals[b0:b0 + bs]
        m = max(max(blk), -min(blk))
        absmax.append(m)
        inv = 1.0 / m if m > 0 else 0.0
        for j in range(0, len(blk), 2):
            hi = bisect.bisect_left(bounds, max(-1.0, min(1.0, blk[j] * inv)))
            lo = bisect.bisect_left(bounds, max(-1.0, min(1.0, blk[j + 1] * inv)))
            codes[(b0 + j) // 2] = (hi << 4) | lo
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def add(name, b):
            ti = tarfile.TarInfo(name)
            ti.size = len(b)
            tar.addfile(ti, io.BytesIO(b))
        tmp = a.dst + ".tmp.safetensors"
        write_safetensors(tmp, rest)
        with open(tmp, "rb") as f:
            add("model-00001-of-00002.safetensors", f.read())
        os.remove(tmp)
        add("embed.json", json.dumps({"shape": e["shape"], "blocksize": bs, "meta": meta}).encode())
        add("embed.codes", bytes(codes))
        add("embed.absmax", absmax.tobytes())
        for name in sorted(os.listdir(a.src)):
            if name.endswith(".json") and name != "model.safetensors.index.json":
                with open(os.path.join(a.src, name), "rb") as f:
                    add(name, f.read())
    blob = buf.getvalue()
    part = a.part_mb * 1_000_000
    os.makedirs(os.path.dirname(a.dst) or ".", exist_ok=True)
    for i in range(0, len(blob), part):
        with open(f"{a.dst}.part{i // part}", "wb") as f:
            f.write(blob[i:i + part])
    print(f"packed {a.src}: {len(blob) / 1e6:.1f} MB in {(len(blob) + part - 1) // part} parts")


def unpack(a):
    import numpy as np
    from safetensors.numpy import save_file

    blob = b"".join(open(p, "rb").read() for p in a.parts)
    os.makedirs(a.out, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    info = json.loads(files.pop("embed.json"))
    codes = np.frombuffer(files.pop("embed.codes"), dtype=np.uint8)
    absmax = np.frombuffer(files.pop("embed.absmax"), dtype=np.float32)
    nib = np.empty(codes.size * 2, dtype=np.uint8)
    nib[0::2] = codes >> 4
    nib[1::2] = codes & 15
    code = np.array(NF4, dtype=np.float32)
    vals = (code[nib].reshape(-1, info["blocksize"]) * absmax[:, None]).astype(np.float32)
    save_file({EMBED: vals.reshape(info["shape"])}, os.path.join(a.out, "model-00002-of-00002.safetensors"))
    for name, b in files.items():
        with open(os.path.join(a.out, name), "wb") as f:
            f.write(b)
    print(f"unpacked to {a.out}: {sorted(os.listdir(a.out))}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--part-mb", type=int, default=36)
    u = sub.add_parser("unpack")
    u.add_argument("parts", nargs="+")
    u.add_argument("--out", required=True)
    a = ap.parse_args()
    pack(a) if a.cmd == "pack" else unpack(a)


if __name__ == "__main__":
    sys.exit(main())
