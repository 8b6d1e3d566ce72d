//! The training forward equals the serving forward (and PEFT's logits); LoRA gradients of the masked
//! causal-LM loss match central finite differences, on fp32 and NF4 bases.

use candle_core::{Device, Tensor};
use qlorad_model::loader::{self, Quant};
use qlorad_model::{Llama, LoraAdapter};
use qlorad_tests::{fixture, rel_err, st_f32};
use qlorad_trainer::step::{collect_grads, loss, Batch, LoraSpec, TrainableLora};
use qlorad_trainer::Example;
use safetensors::SafeTensors;

fn tiny(quant: Quant) -> Llama {
    let dir = if quant == Quant::None {
        "tiny-llama/fp32"
    } else {
        "tiny-llama/bnb-nf4"
    };
    let (cfg, w) = loader::load(&fixture(dir), quant).unwrap();
    Llama::new(cfg, w).unwrap()
}

#[test]
fn training_forward_matches_peft_logits() {
    let buf = std::fs::read(fixture("lora/tiny_logits.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&buf).unwrap();
    let ids = Tensor::new(&[[1u32, 5, 9, 20, 33, 2, 7]], &Device::Cpu).unwrap();
    for (quant, key) in [
        (Quant::None, "r8-all"),
        (Quant::Nf4(Default::default()), "nf4_r8-all"),
    ] {
        let m = tiny(quant);
        let a = LoraAdapter::load(&fixture("lora/tiny-r8-all"), "a", m.config()).unwrap();
        let logits = m
            .forward_train(&ids, &a)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let err = rel_err(&logits, &st_f32(&st, key));
        assert!(err < 1e-5, "{key}: {err}");
    }
}

#[test]
fn lora_gradients_match_finite_differences() {
    for quant in [Quant::None, Quant::Nf4(Default::default())] {
        let m = tiny(quant);
        let a = LoraAdapter::load(&fixture("lora/tiny-r8-all"), "a", m.config()).unwrap();
        let lora = TrainableLora::from_adapter(&a, m.config(), &spec8()).unwrap();
        let ex = [
            Example {
                input_ids: vec![1, 5, 9, 20, 33, 2, 7, 40],
                loss_mask: vec![false, false, false, false, true, true, true, true],
            },
            Example {
                input_ids: vec![3, 4, 5, 6, 7],
                loss_mask: vec![false, true, true, true, true],
            },
        ];
        let batch = Batch::from_examples(&ex.iter().collect::<Vec<_>>(), 0).unwrap();
        assert_eq!(batch.target_count(), 8);
        let l = loss(&m, &lora, &batch).unwrap();
        let named = lora.named_vars();
        let vars: Vec<_> = named.iter().map(|(_, v)| *v).collect();
        let grads = collect_grads(&l.backward().unwrap(), &vars).unwrap();
        // Probe a few elements of an A and a B in different layers and projections.
        for (vi, idx) in [(0usize, 3usize), (1, 5), (9, 17), (26, 2), (27, 40)] {
            let var = vars[vi];
            let orig = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let eps = 1e-2f32;
            let f = |delta: f32| {
                let mut v = orig.clone();
                v[idx] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                loss(&m, &lora, &batch).unwrap().to_scalar::<f32>().unwrap() as f64
            };
            let fd = (f(eps) - f(-eps)) / (2.0 * eps as f64);
            f(0.0);
            let g = grads[vi].flatten_all().unwrap().to_vec1::<f32>().unwrap()[idx] as f64;
            assert!(
                (fd - g).abs() <= 2e-2 * fd.abs().max(g.abs()) + 1e-4,
                "{quant:?} {}[{idx}]: fd {fd} vs grad {g}",
                named[vi].0
            );
        }
    }
}

fn spec8() -> LoraSpec {
    LoraSpec {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        rslora: false,
        targets: vec![],
    }
}
