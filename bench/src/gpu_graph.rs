//! Captured decode steps (model/src/llama_graph.rs) against the eager fused step they record, on
//! a model placed with a stream of its own (the legacy default stream cannot be captured).
//! Teacher-forced on the eager run's tokens, the replayed steps must give the same logits bit
//! for bit: a graph runs the same kernels with the same launch shapes on the same inputs. The
//! runs cross attention split counts (a new shape: one eager step, then a capture, then
//! replays) and grow the KV caches into new buffers mid-run (the graph reads the new addresses
//! from its KV table), and they must have replayed steps at all; all of it once with the
//! attention's splits merged by the combine launch and once inside thread-block clusters
//! (`QLORAD_ATT_CLUSTER`), whose launches a graph records with their cluster shape. A batch with
//! adapters on the BGMV path is captured too: its graphs, captured with one set of adapters,
//! must replay another set of the same ranks (the kept plan readdressed) bit for bit as well.

use super::fused::{differing_bits, model, prompts};
use super::lora::batch_greedy;
use super::Report;
use crate::random_model::{self, RandomSpec};
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
            // A failing run is a failed check, not the end of gpu-check (graphs are new).
            let (differing, on, stats) = match one_case(&m, &prompts(lens, vocab), n) {
                Ok((d, on, stats)) => (d as f64, on, stats),
                Err(e) => {
                    r.add(
                        format!("decode graphs, {name}, {merge}: run"),
                        f64::NAN,
                        0.0,
                        format!("failed: {e}"),
                    );
                    continue;
                }
            };
            r.add(
                format!("decode graphs, {name}, {merge}: replayed vs eager, differing logits"),
                differing,
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
    adapters(&m, vocab, n, r)
}

/// Rows with adapters of ranks 8 and 64 and a base row: graphs captured with one pair of adapters
/// replayed for a second pair of the same ranks (same fingerprint, other addresses).
fn adapters(m: &qlorad_model::Llama, vocab: usize, n: usize, r: &mut Report) -> Result<()> {
    let make = |rank: usize, seed: u64| -> Result<Option<Arc<LoraAdapter>>> {
        let modules = random_model::lora_modules(m.config(), rank, seed)?;
        let name = format!("graph-{rank}-{seed}");
        Ok(Some(Arc::new(m.place_adapter(
            LoraAdapter::from_modules(&name, modules),
        )?)))
    };
    let first = vec![make(8, 21)?, None, make(64, 22)?];
    let second = vec![make(8, 23)?, None, make(64, 24)?];
    let p = prompts(&[40, 70, 25], vocab);
    m.set_decode_graphs(false);
    let want1 = batch_greedy(m, &p, &first, n, None)?;
    let want2 = batch_greedy(m, &p, &second, n, None)?;
    let on = m.set_decode_graphs(true);
    let runs = (|| -> Result<_> {
        let got1 = batch_greedy(m, &p, &first, n, Some(&want1.tokens))?;
        let after1 = m.decode_graph_stats();
        let got2 = batch_greedy(m, &p, &second, n, Some(&want2.tokens))?;
        Ok((got1, after1, got2, m.decode_graph_stats()))
    })();
    m.set_decode_graphs(false);
    let (got1, after1, got2, after2) = match runs {
        Ok(v) => v,
        Err(e) => {
            r.add(
                "decode graphs, 2 adapters (r 8, 64) + a base row: run".into(),
                f64::NAN,
                0.0,
                format!("failed: {e}"),
            );
            return Ok(());
        }
    };
    let what = "decode graphs, 2 adapters (r 8, 64) + a base row";
    r.add(
        format!("{what}: replayed vs eager, differing logits"),
        (differing_bits(&want1, &got1) + differing_bits(&want2, &got2)) as f64,
        0.0,
        format!("3 sequences x {n} steps, twice"),
    );
    r.add(
        format!("{what}: second adapter pair not replayed from the first pair's graphs"),
        f64::from(u8::from(
            !on || after1.replays == 0 || after2.replays == after1.replays,
        )),
        0.0,
        format!(
            "first pair {} captures, {} replays; second pair {} captures, {} replays",
            after1.captures,
            after1.replays,
            after2.captures - after1.captures,
            after2.replays - after1.replays
        ),
    );
    Ok(())
}
