//! Watching a running job: `finetune create --wait` (a progress bar drawn with indicatif: step/total,
//! loss, tokens/s, ETA) and `finetune events --follow`. Both poll the job and its new events about
//! once a second and stop when the job ends.

use crate::finetune::{event_line, utc};
use crate::Failure;
use indicatif::{ProgressBar, ProgressStyle};
use qctl::jobs::{parse_events, Event, EventFeed, Job};
use qctl::Client;
use serde_json::Value;
use std::io::IsTerminal;
use std::time::Duration;

const POLL: Duration = Duration::from_secs(1);
/// The daemon writes a job's last events before its final status (older daemons: just after); one more look after this
/// delay picks them up.
const DRAIN: Duration = Duration::from_millis(300);

/// Exit status of a job that ended: `Ok` if it succeeded.
pub fn outcome(job: &Job) -> Result<(), Failure> {
    match job.status.as_str() {
        "succeeded" => Ok(()),
        status => Err(Failure::Job {
            id: job.id.clone(),
            status: status.to_string(),
            message: job
                .error
                .as_ref()
                .map(|e| e.message.split_whitespace().collect::<Vec<_>>().join(" ")),
        }),
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `loss 1.2345 (val 1.3) · 812 tok/s · ETA 0:42` from the latest metrics event and the job.
fn progress_message(job: &Job, metrics: Option<&Value>) -> String {
    let mut parts = Vec::new();
    if let Some(m) = metrics {
        if let Some(l) = m["train_loss"].as_f64() {
            let mut s = format!("loss {l:.4}");
            if let Some(v) = m["valid_loss"].as_f64() {
                s.push_str(&format!(" (val {v:.4})"));
            }
            parts.push(s);
        }
        if let Some(t) = m["tokens_per_second"].as_f64() {
            parts.push(format!("{t:.0} tok/s"));
        }
    }
    if let Some(f) = job.estimated_finish {
        let left = (f - now()).max(0);
        parts.push(format!("ETA {}:{:02}", left / 60, left % 60));
    }
    parts.join(" · ")
}

/// Polls job `id` until it ends, drawing a progress bar on stderr (when it is a terminal) and
/// printing the job's messages above it. Returns the final job (raw and typed).
pub fn wait_for_job(c: &Client, id: &str, json_out: bool) -> Result<(Value, Job), Failure> {
    // A spinner until the daemon knows the number of steps, then a bar.
    let pb = ProgressBar::new_spinner();
    let style = |template: &str| {
        ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ")
    };
    pb.set_style(style("{spinner} {prefix:<10} {msg} [{elapsed_precise}]"));
    let bar = style("{spinner} {prefix:<10} [{bar:30}] {pos}/{len} {msg} [{elapsed_precise}]");
    let mut sized = false;
    pb.enable_steady_tick(Duration::from_millis(120));
    let say = |line: String| {
        if !pb.is_hidden() {
            pb.println(line);
        } else if !json_out {
            eprintln!("{line}");
        }
    };
    let mut feed = EventFeed::new(id);
    let mut metrics: Option<Value> = None;
    let absorb = |events: Vec<Event>, metrics: &mut Option<Value>| {
        for e in events {
            let line = format!("{}: {}", e.level, e.message);
            if e.kind == "metrics" {
                // Drawn in the bar; printed only where there is no bar (logs, CI).
                if pb.is_hidden() && !json_out {
                    eprintln!("{line}");
                }
                *metrics = Some(e.data);
            } else {
                say(line);
            }
        }
    };
    let result = loop {
        let v = c.job(id)?;
        let job = Job::from_json(&v)?;
        if job.ended() {
            std::thread::sleep(DRAIN);
            absorb(feed.poll(c)?, &mut metrics);
            break (v, job);
        }
        absorb(feed.poll(c)?, &mut metrics);
        if job.total_steps > 0 && !sized {
            pb.set_style(bar.clone());
            pb.set_length(job.total_steps);
            sized = true;
        }
        pb.set_position(job.step);
        pb.set_prefix(job.status.clone());
        pb.set_message(progress_message(&job, metrics.as_ref()));
        std::thread::sleep(POLL);
    };
    pb.finish_and_clear();
    Ok(result)
}

/// `events --follow`: prints the history (the newest `limit` events, or all), then new events as
/// they arrive, oldest first, until the job ends; with `--json` one event object per line.
pub fn follow_events(
    c: &Client,
    id: &str,
    limit: Option<u32>,
    json_out: bool,
) -> Result<(), Failure> {
    let print = |events: &[Event]| {
        for e in events {
            if json_out {
                println!("{}", serde_json::to_string(&e.raw).unwrap_or_default());
            } else {
                println!("{}", event_line(e));
            }
        }
    };
    let mut feed = match limit {
        Some(n) => {
            let (mut recent, _) = parse_events(&c.job_events(id, Some(n), None)?)?;
            recent.reverse();
            print(&recent);
            EventFeed::after(id, &recent)
        }
        None => EventFeed::new(id),
    };
    loop {
        let job = Job::from_json(&c.job(id)?)?;
        if job.ended() {
            std::thread::sleep(DRAIN);
            print(&feed.poll(c)?);
            if !json_out {
                eprintln!(
                    "job {} {} at {}",
                    job.id,
                    job.status,
                    job.finished_at.map_or("-".into(), utc)
                );
            }
            return outcome(&job);
        }
        print(&feed.poll(c)?);
        std::thread::sleep(POLL);
    }
}

/// Polls an export until it ends, with a progress bar on a terminal; returns its final JSON.
pub fn wait_for_export(c: &Client, id: &str, json_out: bool) -> Result<Value, Failure> {
    let bar = (!json_out && std::io::stderr().is_terminal()).then(|| {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} · {bytes_per_sec} · ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    });
    loop {
        let v = c.get(&format!("/v1/exports/{}", qctl::enc(id)))?;
        let status = v["status"].as_str().unwrap_or("").to_string();
        if let Some(b) = &bar {
            b.set_length(v["progress"]["bytes_total"].as_u64().unwrap_or(0));
            b.set_position(v["progress"]["bytes_written"].as_u64().unwrap_or(0));
            b.set_message(status.clone());
        }
        if matches!(status.as_str(), "succeeded" | "failed" | "cancelled") {
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            return Ok(v);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
