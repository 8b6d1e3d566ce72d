//! `qctl finetune`: upload data and create fine-tuning jobs, then list, inspect, cancel, pause and
//! resume them, read (or follow) their events and list their checkpoints. Talks to OpenAI's
//! `files` and `fine_tuning.jobs` routes; `--json` prints the API's documents unchanged.

use crate::watch::{follow_events, wait_for_job};
use crate::Failure;
use clap::{Args, Subcommand};
use qctl::jobs::{parse_events, Hyperparameters, Job, JobSpec};
use qctl::{Client, ClientError};
use serde_json::Value;
use std::path::Path;

#[derive(Subcommand)]
pub enum FinetuneCmd {
    /// Upload training data (or reuse an uploaded `file-…` id) and start a job.
    Create(Box<CreateArgs>),
    /// List jobs, newest first.
    List {
        /// At most this many jobs (1–100; the daemon's default is 20).
        #[arg(long)]
        limit: Option<u32>,
        /// Only jobs older than this job id (the last id of the previous page).
        #[arg(long)]
        after: Option<String>,
    },
    /// Show one job.
    Get { id: String },
    /// Cancel a job (a running job stops at its next step).
    Cancel { id: String },
    /// Pause a job (a running job checkpoints first).
    Pause { id: String },
    /// Queue a paused job again; it continues from its latest checkpoint.
    Resume { id: String },
    /// Show a job's events, oldest first.
    Events {
        id: String,
        /// Keep printing new events until the job ends (exit code 6 if it failed or was cancelled).
        #[arg(long, short)]
        follow: bool,
        /// Only the newest N events (1–100; default: 20, or the whole history with --follow).
        #[arg(long)]
        limit: Option<u32>,
    },
    /// List a job's checkpoints (each servable by its name), highest step first.
    Checkpoints {
        id: String,
        #[arg(long)]
        limit: Option<u32>,
        #[arg(long)]
        after: Option<String>,
    },
}

#[derive(Args)]
pub struct CreateArgs {
    /// Training data (JSONL) to upload, or the id of an uploaded file (`file-…`).
    #[arg(long)]
    file: String,
    /// Validation data (JSONL) to upload, or a file id.
    #[arg(long)]
    validation_file: Option<String>,
    /// The base model (the daemon's model id).
    #[arg(long)]
    model: String,
    /// Part of the fine-tuned model's name: ft:BASE:SUFFIX:JOB.
    #[arg(long)]
    suffix: Option<String>,
    /// Epochs (default: auto).
    #[arg(long)]
    epochs: Option<u32>,
    /// Examples per step (default: auto).
    #[arg(long)]
    batch_size: Option<u32>,
    /// Learning-rate multiplier of the base rate 2e-4 (default: auto = 1).
    #[arg(long)]
    lr_mult: Option<f64>,
    /// LoRA rank.
    #[arg(long)]
    lora_r: Option<u32>,
    /// LoRA alpha.
    #[arg(long)]
    lora_alpha: Option<f64>,
    /// LoRA dropout.
    #[arg(long)]
    lora_dropout: Option<f64>,
    /// Projections to adapt, comma-separated (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj).
    #[arg(long, value_delimiter = ',')]
    target_modules: Option<Vec<String>>,
    /// Longest example in tokens.
    #[arg(long)]
    max_seq_len: Option<u32>,
    /// Steps between checkpoints.
    #[arg(long)]
    checkpoint_interval: Option<u32>,
    #[arg(long)]
    seed: Option<u64>,
    /// Follow the job with a progress bar until it ends; print the fine-tuned model's name.
    #[arg(long)]
    wait: bool,
}

pub fn run(c: &Client, cmd: FinetuneCmd, json_out: bool) -> Result<(), Failure> {
    match cmd {
        FinetuneCmd::Create(args) => create(c, *args, json_out),
        FinetuneCmd::List { limit, after } => {
            let v = c.list_jobs(limit, after.as_deref())?;
            show(json_out, &v, list_table)
        }
        FinetuneCmd::Get { id } => {
            let v = c.job(&id)?;
            show(json_out, &v, job_table)
        }
        FinetuneCmd::Cancel { id } => action(c, &id, "cancel", json_out),
        FinetuneCmd::Pause { id } => action(c, &id, "pause", json_out),
        FinetuneCmd::Resume { id } => action(c, &id, "resume", json_out),
        FinetuneCmd::Events { id, follow, limit } => {
            if follow {
                return follow_events(c, &id, limit, json_out);
            }
            let v = c.job_events(&id, limit, None)?;
            show(json_out, &v, |v| {
                let (mut events, _) = parse_events(v)?;
                events.reverse();
                for e in &events {
                    println!("{}", event_line(e));
                }
                Ok(())
            })
        }
        FinetuneCmd::Checkpoints { id, limit, after } => {
            let v = c.job_checkpoints(&id, limit, after.as_deref())?;
            show(json_out, &v, checkpoints_table)
        }
    }
}

/// Prints `v` as JSON or as `table` renders it.
fn show(
    json_out: bool,
    v: &Value,
    table: impl FnOnce(&Value) -> Result<(), ClientError>,
) -> Result<(), Failure> {
    if json_out {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        Ok(())
    } else {
        Ok(table(v)?)
    }
}

fn action(c: &Client, id: &str, action: &str, json_out: bool) -> Result<(), Failure> {
    let v = c.job_action(id, action)?;
    show(json_out, &v, |v| {
        let j = Job::from_json(v)?;
        println!("{}\t{}", j.id, j.status);
        Ok(())
    })
}

/// A local path is uploaded (its id is added to `uploaded`); otherwise a `file-…` argument is taken
/// as an uploaded file's id.
fn file_id(
    c: &Client,
    arg: &str,
    json_out: bool,
    uploaded: &mut Vec<String>,
) -> Result<String, ClientError> {
    let path = Path::new(arg);
    if !path.exists() && arg.starts_with("file-") {
        return Ok(arg.to_string());
    }
    if !path.exists() {
        return Err(ClientError::Input(format!(
            "{arg}: no such file (and not a `file-…` id)"
        )));
    }
    let v = c.upload_file(path, "fine-tune")?;
    let id = v["id"]
        .as_str()
        .ok_or_else(|| ClientError::Protocol("the uploaded file has no id".into()))?;
    if !json_out {
        eprintln!("uploaded {arg} as {id}");
    }
    uploaded.push(id.to_string());
    Ok(id.to_string())
}

fn create(c: &Client, a: CreateArgs, json_out: bool) -> Result<(), Failure> {
    let mut uploaded = Vec::new();
    let created = create_job(c, &a, json_out, &mut uploaded);
    if created.is_err() {
        // Nothing refers to the files this command uploaded: remove them (best effort).
        for id in &uploaded {
            let _ = c.delete(&format!("/v1/files/{}", qctl::enc(id)));
        }
    }
    let (v, job) = created?;
    if !a.wait {
        return show(json_out, &v, |_| {
            println!("{}", job.id);
            Ok(())
        });
    }
    if !json_out {
        eprintln!("created {}", job.id);
    }
    let (v, job) = wait_for_job(c, &job.id, json_out)?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else if let Some(m) = &job.fine_tuned_model {
        println!("{m}");
    }
    crate::watch::outcome(&job)
}

/// Uploads the data files (unless given as ids) and creates the job.
fn create_job(
    c: &Client,
    a: &CreateArgs,
    json_out: bool,
    uploaded: &mut Vec<String>,
) -> Result<(Value, Job), ClientError> {
    let training_file = file_id(c, &a.file, json_out, uploaded)?;
    let validation_file = match &a.validation_file {
        Some(f) => Some(file_id(c, f, json_out, uploaded)?),
        None => None,
    };
    let spec = JobSpec {
        model: a.model.clone(),
        training_file,
        validation_file,
        suffix: a.suffix.clone(),
        seed: a.seed,
        hyperparameters: Hyperparameters {
            n_epochs: a.epochs,
            batch_size: a.batch_size,
            learning_rate_multiplier: a.lr_mult,
            lora_r: a.lora_r,
            lora_alpha: a.lora_alpha,
            lora_dropout: a.lora_dropout,
            target_modules: a.target_modules.clone(),
            max_seq_len: a.max_seq_len,
            checkpoint_interval: a.checkpoint_interval,
        },
    };
    let v = c.create_job(&spec)?;
    let job = Job::from_json(&v)?;
    Ok((v, job))
}

fn list_table(v: &Value) -> Result<(), ClientError> {
    println!("ID\tSTATUS\tSTEP\tCREATED\tFINE_TUNED_MODEL");
    for j in v["data"].as_array().into_iter().flatten() {
        let j = Job::from_json(j)?;
        println!(
            "{}\t{}\t{}/{}\t{}\t{}",
            j.id,
            j.status,
            j.step,
            j.total_steps,
            utc(j.created_at),
            j.fine_tuned_model.as_deref().unwrap_or("-")
        );
    }
    if v["has_more"].as_bool() == Some(true) {
        if let Some(last) = v["data"].as_array().and_then(|d| d.last()) {
            eprintln!("(more: --after {})", last["id"].as_str().unwrap_or(""));
        }
    }
    Ok(())
}

fn job_table(v: &Value) -> Result<(), ClientError> {
    let j = Job::from_json(v)?;
    let s = |k: &str| v[k].as_str().unwrap_or("-").to_string();
    let hp = &v["method"]["supervised"]["hyperparameters"];
    let rows = [
        ("id", j.id.clone()),
        ("status", j.status.clone()),
        ("model", j.model.clone()),
        ("fine_tuned_model", s("fine_tuned_model")),
        ("training_file", s("training_file")),
        ("validation_file", s("validation_file")),
        ("step", format!("{}/{}", j.step, j.total_steps)),
        (
            "trained_tokens",
            j.trained_tokens.map_or("-".into(), |t| t.to_string()),
        ),
        ("created", utc(j.created_at)),
        ("finished", j.finished_at.map_or("-".into(), utc)),
        (
            "estimated_finish",
            j.estimated_finish.map_or("-".into(), utc),
        ),
        ("hyperparameters", hp.to_string()),
    ];
    for (k, val) in rows {
        println!("{k}:\t{val}");
    }
    if let Some(e) = &j.error {
        println!(
            "error:\t{} ({})",
            e.message,
            e.code.as_deref().unwrap_or("error")
        );
    }
    Ok(())
}

fn checkpoints_table(v: &Value) -> Result<(), ClientError> {
    println!("STEP\tTRAIN_LOSS\tCREATED\tNAME");
    for c in v["data"].as_array().into_iter().flatten() {
        let loss = c["metrics"]["train_loss"]
            .as_f64()
            .map_or("-".into(), |l| format!("{l:.4}"));
        println!(
            "{}\t{loss}\t{}\t{}",
            c["step_number"],
            utc(c["created_at"].as_i64().unwrap_or(0)),
            c["fine_tuned_model_checkpoint"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

pub fn event_line(e: &qctl::jobs::Event) -> String {
    format!("{}\t{}\t{}", utc(e.created_at), e.level, e.message)
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS` (UTC), by Hinnant's civil-from-days.
pub fn utc(t: i64) -> String {
    let (days, secs) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::utc;

    #[test]
    fn formats_unix_time_as_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc(1_767_225_599), "2025-12-31 23:59:59");
    }
}
