//! qctl: the admin CLI of qlorad. Its commands (models, adapters, chat, finetune) talk to a running
//! daemon over HTTP and arrive with the serving and jobs work; for now it reports its version.

use clap::Parser;

#[derive(Parser)]
#[command(name = "qctl", version, about = "Admin CLI for the qlorad daemon")]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    Ok(())
}
