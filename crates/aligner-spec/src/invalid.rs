//! The error for input a user got wrong outside a pipeline file (a flag, a file name, a run
//! that does not exist), shared by every front end: the CLI maps it to exit code 2.

/// "Your input is wrong" (exit code 2 in the CLI).
#[derive(Debug)]
pub enum Invalid {
    /// Already printed (validation reports).
    Silent,
    /// What was wrong, with a `hint:` line when a fix is known.
    Message(String),
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Invalid::Silent => write!(f, "invalid input"),
            Invalid::Message(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for Invalid {}
