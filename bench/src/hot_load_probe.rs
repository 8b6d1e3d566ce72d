//! `qlorad-bench hot-load-probe` (needs the cuda feature): where an adapter hot-load's time goes.
//! Loads a PEFT adapter folder as the GPU hot-load does (packed bf16 host form, then the pinned
//! ring upload), several times, and beside it the pieces it is made of measured alone on the same
//! 336 MB: a parallel read pass over the mapped file, a parallel fill of fresh host memory, fills of
//! write-combined and of cached pinned memory, one DMA from pinned memory, a copy from pageable
//! memory, and pinning the host buffer in place (cuMemHostRegister). Prints ms per piece.

use anyhow::{Context, Result};
use candle_core::cuda_backend::cudarc::driver::{result, sys, DevicePtr};
use candle_core::Device;
use half::bf16;
use qlorad_model::{Config, DeviceSpec, LoraAdapter, Placement};
use rayon::prelude::*;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct HotLoadProbeArgs {
    /// Model folder whose config.json gives the shapes.
    #[arg(long)]
    model: PathBuf,
    /// PEFT adapter folder (qlorad-bench write-adapter).
    #[arg(long)]
    adapter: PathBuf,
    #[arg(long, default_value = "cuda:0")]
    device: DeviceSpec,
    #[arg(long, default_value_t = 4)]
    reps: usize,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn report(what: &str, runs: Vec<f64>, bytes: usize) {
    let m = median(runs.clone());
    println!(
        "PROBE {what:<44} {m:7.1} ms  {:6.1} GB/s  (runs {runs:.1?})",
        bytes as f64 / m / 1e6
    );
}

const PIECE: usize = 256 << 10;

fn par_copy(dst: &mut [bf16], src: &[bf16]) {
    dst.par_chunks_mut(PIECE)
        .zip(src.par_chunks(PIECE))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

pub fn run(a: HotLoadProbeArgs) -> Result<()> {
    let cfg = Config::from_file(&a.model.join("config.json"))?;
    let p = Placement::open(a.device)?;
    let Device::Cuda(cd) = &p.device else {
        anyhow::bail!("the probe needs a CUDA device");
    };
    let stream = cd.cuda_stream();
    println!("rayon threads: {}", rayon::current_num_threads());

    // The hot-load: file -> pinned staging -> GPU, as it converts.
    let mut runs = Vec::new();
    for _ in 0..a.reps {
        let t = Instant::now();
        drop(LoraAdapter::load_placed(&a.adapter, "probe", &cfg, &p)?);
        p.synchronize()?;
        runs.push(ms(t));
    }
    let first = runs.clone();
    // Through the packed host form, end to end.
    let (mut reads, mut places, mut totals) = (Vec::new(), Vec::new(), Vec::new());
    let mut host = None;
    for _ in 0..a.reps {
        let t = Instant::now();
        let h = LoraAdapter::load_for(&a.adapter, "probe", &cfg, &p)?;
        reads.push(ms(t));
        let t1 = Instant::now();
        drop(h.to_placement(&p)?);
        p.synchronize()?;
        places.push(ms(t1));
        totals.push(ms(t));
        host = Some(h);
    }
    let host = host.context("no load")?;
    let bytes = host.bytes();
    report("load_placed (file -> pinned ring -> GPU)", first, bytes);
    report("load_packed (file -> packed bf16 host)", reads, bytes);
    report("to_placement (pinned ring upload)", places, bytes);
    report("hot-load total", totals, bytes);

    // A read pass over the file as mapped (page faults + reading 2x the bytes as f32).
    let file = std::fs::File::open(a.adapter.join("adapter_model.safetensors"))?;
    let mut runs = Vec::new();
    for _ in 0..a.reps {
        let t = Instant::now();
        // SAFETY: read-only map of a file nobody truncates during the probe.
        let map = unsafe { memmap2::Mmap::map(&file)? };
        let s: u64 = map
            .par_chunks(1 << 20)
            .map(|c| c.iter().step_by(64).map(|&b| u64::from(b)).sum::<u64>())
            .sum();
        std::hint::black_box(s);
        runs.push(ms(t));
    }
    report(
        "map + touch every cache line of the f32 file",
        runs,
        bytes * 2,
    );

    let n = bytes / 2;
    let src: Vec<bf16> = (0..n).map(|i| bf16::from_bits(i as u16)).collect();
    let mut runs = Vec::new();
    for _ in 0..a.reps {
        let t = Instant::now();
        let mut fresh = vec![bf16::ZERO; n];
        par_copy(&mut fresh, &src);
        std::hint::black_box(&fresh);
        runs.push(ms(t));
    }
    report("fresh host buffer, parallel fill", runs, bytes);

    let ctx = stream.context();
    for (name, flags) in [
        ("write-combined", sys::CU_MEMHOSTALLOC_WRITECOMBINED),
        ("cached", 0),
    ] {
        let t = Instant::now();
        // SAFETY: filled below before any read.
        let mut pinned = unsafe { ctx.alloc_pinned_with_flags::<bf16>(n, flags)? };
        report(&format!("alloc pinned {name}"), vec![ms(t)], bytes);
        let buf = pinned.as_mut_slice()?;
        let mut runs = Vec::new();
        for _ in 0..a.reps {
            let t = Instant::now();
            par_copy(buf, &src);
            runs.push(ms(t));
        }
        report(&format!("parallel fill of pinned {name}"), runs, bytes);
        let dst = unsafe { stream.alloc::<bf16>(n)? };
        let mut runs = Vec::new();
        for _ in 0..a.reps {
            stream.synchronize()?;
            let t = Instant::now();
            let (ptr, _g) = dst.device_ptr(&stream);
            // SAFETY: dst holds n elements; the pinned buffer outlives the synchronize below.
            unsafe { result::memcpy_htod_async(ptr, &buf[..], stream.cu_stream())? };
            stream.synchronize()?;
            runs.push(ms(t));
        }
        report(&format!("one DMA from pinned {name}"), runs, bytes);
    }

    let mut dst = unsafe { stream.alloc::<bf16>(n)? };
    let mut runs = Vec::new();
    for _ in 0..a.reps {
        stream.synchronize()?;
        let t = Instant::now();
        stream.memcpy_htod(&src, &mut dst)?;
        stream.synchronize()?;
        runs.push(ms(t));
    }
    report("copy from pageable memory (driver staging)", runs, bytes);

    let (mut reg, mut dma, mut unreg) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..a.reps {
        let mut fresh = src.clone();
        let t = Instant::now();
        // SAFETY: the buffer stays alive and unmoved until unregistered below.
        unsafe {
            sys::cuMemHostRegister_v2(fresh.as_mut_ptr().cast(), bytes, 0)
                .result()
                .context("cuMemHostRegister")?;
        }
        reg.push(ms(t));
        let t = Instant::now();
        let (ptr, _g) = dst.device_ptr(&stream);
        unsafe { result::memcpy_htod_async(ptr, &fresh[..], stream.cu_stream())? };
        stream.synchronize()?;
        dma.push(ms(t));
        let t = Instant::now();
        unsafe {
            sys::cuMemHostUnregister(fresh.as_mut_ptr().cast())
                .result()
                .context("cuMemHostUnregister")?;
        }
        unreg.push(ms(t));
    }
    report("cuMemHostRegister of the host buffer", reg, bytes);
    report("one DMA from the registered buffer", dma, bytes);
    report("cuMemHostUnregister", unreg, bytes);
    Ok(())
}
