//! qlorad-trainer: QLoRA training on a frozen NF4 base (data, step, optimizer, checkpoints,
//! merge/export). The training engine lands with its own issue; the crate exists now so that the
//! daemon's dependency on it (through a job-runner interface) is in place from the start.
