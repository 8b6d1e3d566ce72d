//! qctl: the admin CLI of qlorad. Talks to a running daemon (`QLORAD_URL`, `QLORAD_API_KEY`);
//! `--json` prints the raw API answers for scripts. Exit codes: see [`EXIT_CODES`].

mod finetune;
mod watch;

use clap::{Parser, Subcommand};
use qctl::{Client, ClientError};
use serde_json::{json, Value};
use std::io::{BufRead, Write};
use std::process::ExitCode;

/// The exit codes scripts can rely on (also shown by `qctl --help`).
const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  error (server error, unexpected response)
  2  usage or invalid input: bad arguments, a missing local file, or a request the daemon refused
     as invalid (HTTP 400/413/422: malformed JSONL, unknown base model, out-of-range value)
  3  daemon unreachable
  4  unauthorized or forbidden (HTTP 401/403: missing key, wrong key, scope)
  5  not found (HTTP 404: unknown job, file, adapter or model)
  6  the job ended failed or cancelled (finetune create --wait, finetune events --follow,
     adapters promote --wait)";

/// Why a command did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A watched job ended without succeeding.
    #[error("job {id} {status}{}", message.as_ref().map(|m| format!(": {m}")).unwrap_or_default())]
    Job {
        id: String,
        status: String,
        message: Option<String>,
    },
}

impl Failure {
    fn exit_code(&self) -> u8 {
        match self {
            Failure::Client(e) => e.exit_code(),
            Failure::Job { .. } => 6,
        }
    }
}

#[derive(Parser)]
#[command(
    name = "qctl",
    version,
    about = "Admin CLI for the qlorad daemon",
    after_help = EXIT_CODES
)]
struct Cli {
    /// Daemon URL.
    #[arg(
        long,
        env = "QLORAD_URL",
        default_value = "http://127.0.0.1:8000",
        global = true
    )]
    url: String,
    /// API key (admin scope for adapter commands and for changing files and jobs).
    #[arg(long, env = "QLORAD_API_KEY", hide_env_values = true, global = true)]
    api_key: Option<String>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the servable models (base and adapters).
    Models,
    /// Manage LoRA adapters.
    #[command(subcommand)]
    Adapters(AdapterCmd),
    /// Chat with a model, streaming; interactive unless --prompt is given.
    Chat {
        /// Model id (the base model's id or an adapter's name); default: the first listed.
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        system: Option<String>,
        /// One message, answered once (no interactive loop).
        #[arg(long)]
        prompt: Option<String>,
        #[arg(long, default_value_t = 0.7)]
        temperature: f32,
        #[arg(long, default_value_t = 512)]
        max_tokens: u32,
    },
    /// Fine-tune adapters: create jobs (uploading their data), follow, list and control them.
    #[command(subcommand, after_help = EXIT_CODES)]
    Finetune(finetune::FinetuneCmd),
}

#[derive(Subcommand)]
enum AdapterCmd {
    /// List adapters with their tier (device/host/disk), pin state and the devices holding a copy.
    List,
    /// Load (or replace) an adapter from a folder under the daemon's adapter root.
    Load {
        name: String,
        #[arg(long)]
        path: String,
    },
    /// Unload an adapter.
    Unload { name: String },
    /// Keep an adapter resident (never evicted).
    Pin { name: String },
    /// Allow an adapter to be evicted again.
    Unpin { name: String },
    /// Merge an adapter into a full-precision copy of the base and export a Hugging Face model
    /// folder under the daemon's export root (a background export job).
    Promote {
        name: String,
        /// Output folder name (under the export root).
        #[arg(long)]
        out: String,
        /// f16, bf16 or f32.
        #[arg(long, default_value = "bf16")]
        dtype: String,
        /// original (the base's full-precision weights) or dequantized (dequant(NF4), the weights
        /// the adapter was trained against).
        #[arg(long, default_value = "original")]
        merge_into: String,
        #[arg(long)]
        overwrite: bool,
        /// Follow the export to its end with a progress bar; exit 6 if it fails or is cancelled.
        #[arg(long)]
        wait: bool,
    },
}

fn print(json_out: bool, v: &Value, table: impl FnOnce(&Value)) {
    if json_out {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        table(v);
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    let c = Client::new(&cli.url, cli.api_key.clone());
    match cli.command {
        Command::Finetune(cmd) => finetune::run(&c, cmd, cli.json)?,
        Command::Models => {
            let v = c.get("/v1/models")?;
            print(cli.json, &v, |v| {
                for m in v["data"].as_array().into_iter().flatten() {
                    match m["parent"].as_str() {
                        Some(p) => println!("{}\t(adapter of {p})", m["id"].as_str().unwrap_or("")),
                        None => println!("{}", m["id"].as_str().unwrap_or("")),
                    }
                }
            });
        }
        Command::Adapters(AdapterCmd::Promote {
            name,
            out,
            dtype,
            merge_into,
            overwrite,
            wait,
        }) => {
            let v = c.post(
                &format!("/v1/adapters/{}/promote", qctl::enc(&name)),
                &json!({"out": out, "dtype": dtype, "merge_into": merge_into, "overwrite": overwrite}),
            )?;
            let id = v["id"].as_str().unwrap_or("").to_string();
            let v = if wait {
                watch::wait_for_export(&c, &id, cli.json)?
            } else {
                v
            };
            print(cli.json, &v, |v| {
                println!(
                    "{}\t{}\t{}",
                    v["id"].as_str().unwrap_or(""),
                    v["status"].as_str().unwrap_or(""),
                    v["path"].as_str().unwrap_or("")
                )
            });
            if let Some(status) = v["status"].as_str().filter(|s| wait && *s != "succeeded") {
                return Err(Failure::Job {
                    id,
                    status: status.to_string(),
                    message: v["error"]["message"].as_str().map(String::from),
                });
            }
        }
        Command::Adapters(cmd) => {
            let v = match &cmd {
                AdapterCmd::List => c.get("/v1/adapters")?,
                AdapterCmd::Load { name, path } => {
                    c.post("/v1/adapters", &json!({"name": name, "path": path}))?
                }
                AdapterCmd::Unload { name } => {
                    c.delete(&format!("/v1/adapters/{}", qctl::enc(name)))?
                }
                AdapterCmd::Pin { name } => {
                    c.post(&format!("/v1/adapters/{}/pin", qctl::enc(name)), &json!({}))?
                }
                AdapterCmd::Unpin { name } => c.post(
                    &format!("/v1/adapters/{}/unpin", qctl::enc(name)),
                    &json!({}),
                )?,
                AdapterCmd::Promote { .. } => unreachable!("handled above"),
            };
            print(cli.json, &v, |v| match cmd {
                AdapterCmd::List => {
                    println!("NAME\tTIER\tPINNED\tBYTES\tDEVICES\tPATH");
                    for a in v["data"].as_array().into_iter().flatten() {
                        let devices: Vec<&str> = a["devices"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|d| d.as_str())
                            .collect();
                        println!(
                            "{}\t{}\t{}\t{}\t{}\t{}",
                            a["name"].as_str().unwrap_or(""),
                            a["tier"].as_str().unwrap_or(""),
                            a["pinned"],
                            a["bytes"],
                            if devices.is_empty() {
                                "-".to_string()
                            } else {
                                devices.join(",")
                            },
                            a["path"].as_str().unwrap_or("")
                        );
                    }
                }
                AdapterCmd::Unload { name } => println!("unloaded {name}"),
                _ => println!(
                    "{}\ttier={}\tpinned={}",
                    v["name"].as_str().unwrap_or(""),
                    v["tier"].as_str().unwrap_or(""),
                    v["pinned"]
                ),
            });
        }
        Command::Chat {
            model,
            system,
            prompt,
            temperature,
            max_tokens,
        } => {
            let model = match model {
                Some(m) => m,
                None => c.get("/v1/models")?["data"][0]["id"]
                    .as_str()
                    .ok_or_else(|| ClientError::Protocol("the daemon lists no model".into()))?
                    .to_string(),
            };
            let mut messages: Vec<Value> = system
                .iter()
                .map(|s| json!({"role": "system", "content": s}))
                .collect();
            let ask = |messages: &mut Vec<Value>, text: &str| -> Result<(), ClientError> {
                messages.push(json!({"role": "user", "content": text}));
                let body = json!({"model": model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens});
                let mut answer = String::new();
                let mut out = std::io::stdout();
                c.chat_stream(&body, |t| {
                    answer.push_str(t);
                    let _ = out.write_all(t.as_bytes());
                    let _ = out.flush();
                })?;
                println!();
                messages.push(json!({"role": "assistant", "content": answer}));
                Ok(())
            };
            match prompt {
                Some(p) => ask(&mut messages, &p)?,
                None => {
                    eprintln!("chatting with {model} (Ctrl-D to quit)");
                    let stdin = std::io::stdin();
                    loop {
                        eprint!("> ");
                        let mut line = String::new();
                        if stdin.lock().read_line(&mut line).unwrap_or(0) == 0 {
                            break;
                        }
                        let line = line.trim();
                        if !line.is_empty() {
                            ask(&mut messages, line)?;
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qctl: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
