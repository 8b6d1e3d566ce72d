//! Byte-for-byte comparison with `bitsandbytes.functional.quantize_4bit` / `dequantize_4bit`
//! (bitsandbytes 0.50.2, CPU) on the fixtures made by `scripts/fixtures/gen_nf4_fixtures.py`.

use qlorad_kernels::dynamic::dynamic_signed_code;
use qlorad_kernels::nf4::{dequantize_absmax, double_quantize_with_offset};
use qlorad_kernels::{Absmax, Nf4Config, Nf4Tensor};
use safetensors::{Dtype, SafeTensors};
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/nf4")
}

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    let d = t.data();
    match t.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => panic!("{name}: unexpected dtype {other:?}"),
    }
}

fn bytes(st: &SafeTensors, name: &str) -> Vec<u8> {
    st.tensor(name).unwrap().data().to_vec()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Rounds an f32 to the 16-bit dtype bitsandbytes returns for 16-bit inputs.
fn round_to(dtype: &str, v: f32) -> f32 {
    match dtype {
        "bfloat16" => half::bf16::from_f32(v).to_f32(),
        "float16" => half::f16::from_f32(v).to_f32(),
        _ => v,
    }
}

#[test]
fn nf4_quantize_and_dequantize_are_byte_identical_to_bitsandbytes() {
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("index.json")).unwrap())
            .unwrap();
    let code_bits: Vec<u32> = index["dynamic_code_hex"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| u32::from_str_radix(h.as_str().unwrap().trim_start_matches("0x"), 16).unwrap())
        .collect();
    assert_eq!(
        bits(&dynamic_signed_code()),
        code_bits,
        "dynamic 8-bit code table"
    );
    let cases = index["cases"].as_array().unwrap();
    assert!(
        cases.len() >= 20,
        "expected the full fixture set, found {}",
        cases.len()
    );
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let buf = std::fs::read(fixtures().join(case["file"].as_str().unwrap())).unwrap();
        let st = SafeTensors::deserialize(&buf).unwrap();
        let shape: Vec<usize> = serde_json::from_value(case["shape"].clone()).unwrap();
        let bs = case["blocksize"].as_u64().unwrap() as usize;
        let compress = case["compress"].as_bool().unwrap();
        let dtype = case["dtype"].as_str().unwrap();
        let input = f32s(&st, "input");

        let cfg = Nf4Config {
            blocksize: bs,
            double_quant: false,
        };
        let t = Nf4Tensor::quantize(&input, &shape, cfg).unwrap();
        assert_eq!(t.packed, bytes(&st, "packed"), "{name}: packed codes");
        let Absmax::Plain(absmax) = &t.absmax else {
            unreachable!()
        };
        assert_eq!(
            bits(absmax),
            bits(&f32s(&st, "absmax_f32")),
            "{name}: absmax"
        );

        let t = if compress {
            let offset = f32s(&st, "offset")[0];
            // Our own offset is the correctly rounded mean; torch's is within an ulp or two of it.
            let ours = Nf4Tensor::quantize(
                &input,
                &shape,
                Nf4Config {
                    blocksize: bs,
                    double_quant: true,
                },
            )
            .unwrap();
            let Absmax::Double(dq) = &ours.absmax else {
                unreachable!()
            };
            let ulps = (dq.offset.to_bits() as i64 - offset.to_bits() as i64).abs();
            assert!(
                ulps <= 4,
                "{name}: offset {} vs bnb {offset} ({ulps} ulp)",
                dq.offset
            );
            // With bnb's offset every byte must match.
            let dq = double_quantize_with_offset(absmax, offset);
            assert_eq!(
                dq.quantized,
                bytes(&st, "absmax"),
                "{name}: quantized absmax"
            );
            assert_eq!(
                bits(&dq.nested_absmax),
                bits(&f32s(&st, "nested_absmax")),
                "{name}: nested absmax"
            );
            assert_eq!(
                bits(&dq.nested_code[..]),
                bits(&f32s(&st, "nested_code")),
                "{name}: nested code"
            );
            assert_eq!(
                bits(&dequantize_absmax(&dq, t.num_blocks())),
                bits(&f32s(&st, "absmax_dq")),
                "{name}: dequantized absmax"
            );
            Nf4Tensor {
                absmax: Absmax::Double(dq),
                ..t
            }
        } else {
            t
        };
        let deq = t.dequantize();
        let expect_f32 = if st.names().contains(&"dequant_f32") {
            f32s(&st, "dequant_f32")
        } else {
            f32s(&st, "dequant")
        };
        assert_eq!(bits(&deq), bits(&expect_f32), "{name}: dequantize (f32)");
        let deq_dtype: Vec<f32> = deq.iter().map(|&v| round_to(dtype, v)).collect();
        assert_eq!(
            bits(&deq_dtype),
            bits(&f32s(&st, "dequant")),
            "{name}: dequantize ({dtype})"
        );
    }
}
