//! `--config qlorad.toml`: every `serve` option can come from a TOML file, the environment
//! (`QLORAD_*`) or the command line, in increasing precedence. The file's keys are the long option
//! names (`max-inflight` or `max_inflight`); each is applied as its `QLORAD_*` variable unless that is
//! already set, so clap resolves the precedence. Unknown keys are refused (a typo must not silently
//! fall back to a default).

use anyhow::{bail, Context, Result};
use clap::CommandFactory;
use std::path::{Path, PathBuf};

/// The `--config` path from the arguments or `QLORAD_CONFIG`, if any.
fn config_path(args: &[String]) -> Option<PathBuf> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
    }
    std::env::var_os("QLORAD_CONFIG").map(PathBuf::from)
}

/// Environment variables `serve` reads, by long option name.
fn serve_envs() -> Vec<(String, String)> {
    let cmd = crate::cli::Cli::command();
    let Some(serve) = cmd.get_subcommands().find(|c| c.get_name() == "serve") else {
        return vec![];
    };
    serve
        .get_arguments()
        .filter_map(|a| {
            let env = a.get_env()?.to_str()?.to_string();
            Some((a.get_long()?.to_string(), env))
        })
        .collect()
}

fn value_string(key: &str, v: &toml::Value) -> Result<String> {
    Ok(match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Array(a) => a
            .iter()
            .map(|x| value_string(key, x))
            .collect::<Result<Vec<_>>>()?
            .join(","),
        _ => bail!("config key {key:?}: tables are not supported"),
    })
}

/// Reads the config file named on the command line (if any) and exports its settings as `QLORAD_*`
/// variables that are not already set. Call before parsing arguments, while single-threaded.
pub fn apply(args: &[String]) -> Result<()> {
    let Some(path) = config_path(args) else {
        return Ok(());
    };
    apply_file(&path)
}

fn apply_file(path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("parsing config {}", path.display()))?;
    let envs = serve_envs();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let Some((_, env)) = envs.iter().find(|(l, _)| *l == long) else {
            bail!("{}: unknown setting {key:?}", path.display());
        };
        if std::env::var_os(env).is_none() {
            std::env::set_var(env, value_string(key, value)?);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_serve_option_has_an_env_var() {
        let envs = serve_envs();
        for long in [
            "model",
            "listen",
            "max-inflight",
            "api-key",
            "adapter-root",
            "lora",
            "config",
        ] {
            assert!(
                envs.iter().any(|(l, _)| l == long),
                "{long} lacks an env var"
            );
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let d = std::env::temp_dir().join(format!("qlorad-cfg-{}", std::process::id()));
        std::fs::write(&d, "max_inflite = 3\n").unwrap();
        let e = apply_file(&d).unwrap_err();
        assert!(e.to_string().contains("unknown setting"), "{e}");
        let _ = std::fs::remove_file(&d);
    }
}
