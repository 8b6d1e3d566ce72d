//! `qlorad merge`: merges a LoRA adapter into its base model and exports a plain Hugging Face folder
//! (the same library call the daemon's promote jobs make), with a progress line on stderr.

use anyhow::Result;
use qlorad_trainer::merge::{
    merge_and_export, parse_size, ExportDtype, MergeInto, MergeOptions, Progress,
};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct MergeArgs {
    /// Base model folder (full precision, or a bitsandbytes 4-bit checkpoint with --merge-into
    /// dequantized).
    #[arg(long)]
    model: PathBuf,
    /// PEFT LoRA adapter folder.
    #[arg(long)]
    adapter: PathBuf,
    /// Output folder (must not exist unless --overwrite).
    #[arg(long)]
    out: PathBuf,
    /// dtype of the exported weights: f16, bf16 or f32.
    #[arg(long, default_value = "bf16")]
    dtype: ExportDtype,
    /// Merge into the original full-precision weights, or into dequant(NF4(W)), the weights a QLoRA
    /// adapter was trained against (reproduces the served base + adapter).
    #[arg(long, default_value = "original")]
    merge_into: MergeInto,
    /// Largest safetensors shard (e.g. 5GB, 500MB, 2GiB).
    #[arg(long, default_value = "5GB", value_parser = parse_size)]
    max_shard_size: u64,
    /// Replace an existing output folder.
    #[arg(long)]
    overwrite: bool,
    /// Testing only: sleep this many milliseconds after each tensor, so a test can kill the export
    /// mid-way.
    #[arg(long, hide = true, default_value_t = 0)]
    test_delay_ms: u64,
}

pub fn run(a: MergeArgs) -> Result<()> {
    let opts = MergeOptions {
        dtype: a.dtype,
        merge_into: a.merge_into,
        overwrite: a.overwrite,
        max_shard_bytes: a.max_shard_size,
        ..MergeOptions::new(&a.model, &a.adapter, &a.out)
    };
    let t0 = Instant::now();
    let mut stderr = std::io::stderr();
    // A live progress line only on a terminal; logs and pipes get the summary alone.
    let live = stderr.is_terminal();
    let report = merge_and_export(&opts, |p: &Progress| {
        if live {
            let _ = write!(
                stderr,
                "\rmerging: {}/{} tensors, {:.1}/{:.1} MB",
                p.tensors_done,
                p.tensors_total,
                p.bytes_written as f64 / 1e6,
                p.bytes_total as f64 / 1e6
            );
            let _ = stderr.flush();
        }
        if a.test_delay_ms > 0 {
            std::thread::sleep(Duration::from_millis(a.test_delay_ms));
        }
    });
    if live {
        // Clear the progress line whatever happened, so an error starts on a line of its own.
        eprint!("\r\x1b[2K");
    }
    let report = report?;
    let shards = report
        .files
        .iter()
        .filter(|f| f.name.ends_with(".safetensors"))
        .count();
    eprintln!(
        "exported {} -> {}: {} tensors ({} adapted projections merged into the {} weights), {} as {} in {} shard(s), {:.1}s",
        a.adapter.display(),
        report.out_dir.display(),
        report.tensors,
        report.merged_modules,
        a.merge_into.as_str(),
        format_bytes(report.total_size),
        a.dtype.torch_name(),
        shards,
        t0.elapsed().as_secs_f64()
    );
    if !report.skipped.is_empty() {
        eprintln!(
            "left out {} tensor(s) the architecture does not use: {}",
            report.skipped.len(),
            report.skipped.join(", ")
        );
    }
    Ok(())
}

fn format_bytes(n: u64) -> String {
    format!("{:.1} MB", n as f64 / 1e6)
}
