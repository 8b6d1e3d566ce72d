//! Captured decode steps (model/src/llama_graph.rs) against the eager fused step they record, on
//! a model placed with a stream of its own (the legacy default stream cannot be captured).
//! Teacher-forced on the eager run's tokens, the replayed steps must give the same logits bit
//! for bit: a graph runs the same kernels with the same launch shapes on the same inputs. The
//! runs cross attention split counts (a new shape: one eager step, then a capture, then
//! replays) and grow the KV caches into new buffers mid-run (the graph reads the new addresses
//! from its KV table), and they must have replayed steps at all; all of it once with the
//! attention's splits merged by the combine launch and once inside thread-block clusters
//! (`QLORAD_ATT_CLUSTER`), whose launches a graph records with their cluster shape.

use super::fused::{differing_bits, model, prompts};
use super::lora::batch_greedy;
use super::Report;
use crate::random_model::RandomSpec;
use anyhow::Result;
use qlorad_model::{DeviceSpec, LoraAdapter, Placement};
use std::sync::Arc;

/// One case: eager, then teacher-forced with graphs on; (differing logits, whether graphs were
/// on, the graphs' counts). Graphs are off again afterwards.
fn one_case(
    m: &qlorad_model::Llama,
    p: &[Vec<u32>],
    n: usize,
) -> Result<(usize, bool, qlorad_model::llama::DecodeGraphStats)> {
    let none: Vec<Option<Arc<LoraAdapter>>> = vec![None; p.len()];
    m.set_decode_graphs(false);
    let want = batch_greedy(m, p, &none, n, None)?;
    let on = m.set_decode_graphs(true);
    let got = batch_greedy(m, p, &none, n, Some(&want.tokens));
    let stats = m.decode_graph_stats();
    m.set_decode_graphs(false);
    Ok((differing_bits(&want, &got?), on, stats))
}

pub fn checks(device: DeviceSpec, n: usize, r: &mut Report) -> Result<()> {
    let gpu = Placement::open_own_stream(device)?;
    let vocab = RandomSpec::small().vocab;
    let m = model(&gpu, None)?;
    let cases: [(&str, &[usize]); 3] = [
        ("1 row from 60 positions", &[60]),
        ("3 rows, contexts 150 / 40 / 95", &[150, 40, 95]),
        ("2 rows, one-token prompts", &[1, 1]),
    ];
    let cluster_was = qlorad_kernels::step_graph_cuda::cluster_merge();
    for cluster in [false, true] {
        qlorad_kernels::step_graph_cuda::set_cluster_merge(cluster);
        let merge = if cluster {
            "cluster merge"
        } else {
            "combine launch"
        };
        for (name, lens) in cases {
            let r_case = one_case(&m, &prompts(lens, vocab), n);
            let (differing, on, stats) = match r_case {
                Ok(v) => v,
                Err(e) => {
                    qlorad_kernels::step_graph_cuda::set_cluster_merge(cluster_was);
                    return Err(e);
                }
            };
            r.add(
                format!("decode graphs, {name}, {merge}: replayed vs eager, differing logits"),
                differing as f64,
                0.0,
                format!("{} sequences x {n} steps", lens.len()),
            );
            r.add(
                format!("decode graphs, {name}, {merge}: no step replayed"),
                f64::from(u8::from(!on || stats.replays == 0)),
                0.0,
                format!(
                    "on {on}, {} captures, {} replays, {} kept",
                    stats.captures, stats.replays, stats.kept
                ),
            );
        }
    }
    qlorad_kernels::step_graph_cuda::set_cluster_merge(cluster_was);
    Ok(())
}
