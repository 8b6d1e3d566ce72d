//! The training step's gradients through hand-written layer backwards (`Llama::block_backward`,
//! model/src/llama_backward.rs) on a GPU with the fused ops: the same result as candle's
//! autograd over the same ops ([`crate::step::loss_and_grads_autograd`]), in less time and memory.

use crate::step::{Batch, Result, StepError};
use candle_core::{Tensor, TensorId, Var};
use qlorad_model::llama::train::LoraWeights;
use qlorad_model::Llama;
use std::collections::HashMap;

/// [`crate::step::loss_and_grads_hooked`] for a model whose training ops are fused.
#[allow(clippy::too_many_arguments)] // loss_and_grads_hooked's, the pause made from its callback
pub(crate) fn loss_and_grads(
    model: &Llama,
    lora: &dyn LoraWeights,
    batch: &Batch,
    vars: &[&Var],
    scale: f64,
    checkpointing: bool,
    pause: &dyn Fn(),
    before_layer: &dyn Fn(usize) -> Result<()>,
) -> Result<(f64, Vec<Tensor>)> {
    let ctx = model.train_context(batch.seq)?;
    let n = model.num_layers();
    // Without checkpointing every layer's activations are kept from the forward; with it only
    // the layer inputs, and each layer's forward runs again just before its backward (Chen et
    // al., 2016; transformers' per-layer policy).
    let mut inputs = Vec::with_capacity(n + 1);
    let mut saved = Vec::with_capacity(if checkpointing { 0 } else { n });
    inputs.push(model.embed_train(&batch.ids)?);
    for li in 0..n {
        before_layer(li)?;
        let (y, acts) = model.block_forward_saved(li, &inputs[li], &ctx, lora, pause)?;
        if !checkpointing {
            saved.push(acts);
        }
        inputs.push(y);
        pause();
    }
    before_layer(usize::MAX)?;
    // The head and loss with their backward by hand too: the loss and its gradient at the last
    // layer's output.
    let top = inputs
        .pop()
        .ok_or_else(|| StepError::Invalid("no layer output".into()))?;
    let targets = crate::step::row_targets(batch)?;
    let (l, mut g) = model.head_backward(&top, &targets, scale as f32, &ctx, pause)?;
    let value = l.to_scalar::<f32>()? as f64 * scale;
    drop(top);

    let index: HashMap<TensorId, usize> = vars
        .iter()
        .enumerate()
        .map(|(i, v)| (v.as_tensor().id(), i))
        .collect();
    let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
    let mut put = |t: &Tensor, gt: Tensor| -> Result<()> {
        if let Some(&i) = index.get(&t.id()) {
            grads[i] = Some(match grads[i].take() {
                None => gt,
                Some(acc) => (acc + gt)?,
            });
        }
        Ok(())
    };
    for li in (0..n).rev() {
        let x = inputs
            .pop()
            .ok_or_else(|| StepError::Invalid("layer inputs".into()))?;
        let acts = match saved.pop() {
            Some(a) => a,
            None => {
                let acts = model.block_acts(li, &x, &ctx, lora, pause)?;
                pause();
                acts
            }
        };
        drop(x);
        let lg = model.block_backward(li, acts, &g, &ctx, lora, pause)?;
        for (proj, da, db) in lg.lora {
            if let Some((a, b, _)) = lora.module(li, proj) {
                put(a, da)?;
                put(b, db)?;
            }
        }
        g = lg.dx;
        pause();
    }
    Ok((value, crate::step::fill_missing(grads, vars)?))
}
