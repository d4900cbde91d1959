//! Cluster scheduler clients for the train stage (`rounds.train.backend: {kind: ray}` and
//! `{kind: slurm}`), behind the engine's [`ClusterJobs`](aligner_engine::cluster::ClusterJobs).
//! The engine decides when to submit, look and stop ([`aligner_engine::cluster`]); these only
//! turn those calls into requests or commands and the answers into job states, keeping the
//! scheduler's own words in every error.

mod ray;
mod slurm;

pub use ray::RayJobs;
pub use slurm::SlurmJobs;
