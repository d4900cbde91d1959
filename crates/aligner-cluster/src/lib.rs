//! What a round needs from a cluster: scheduler clients for the train stage
//! (`rounds.train.backend: {kind: ray}` and `{kind: slurm}`), behind the engine's
//! [`ClusterJobs`](aligner_engine::cluster::ClusterJobs), and the HTTP side of serving the
//! checkpoint (`rounds.train.serve`), behind its
//! [`CheckpointServer`](aligner_engine::serving::CheckpointServer).
//! The engine decides when to submit, look and stop ([`aligner_engine::cluster`]); these only
//! turn those calls into requests or commands and the answers into job states, keeping the
//! scheduler's own words in every error.

mod ray;
mod serve;
mod slurm;

pub use ray::RayJobs;
pub use serve::HttpServing;
pub use slurm::SlurmJobs;
