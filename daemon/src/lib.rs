//! The qlorad daemon: HTTP API, inference engine (continuous batching), metrics, and the CLI.

pub mod adapters;
pub mod api;
pub mod auth;
pub mod cli;
pub mod config_file;
pub mod engine;
pub mod exports;
pub mod http;
pub mod jobs;
pub mod merge_cmd;
pub mod metrics;
pub mod pending;
pub mod runner;
pub mod server;
pub mod shards;
pub mod state;
pub mod train_cmd;
