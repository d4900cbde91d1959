//! Errors in a pipeline file: each names the file, the line and column of the offending
//! node, its dotted YAML path and, where one is known, a hint.
//!
//! Display of one error (snapshot-tested):
//!
//! ```text
//! error: unknown field `temprature`
//!   --> pipelines/x.yaml:14:7
//!    at: rounds.generate.sampling.temprature
//!   hint: did you mean `temperature`?
//! ```

use std::fmt;
use std::path::PathBuf;

/// One problem in a pipeline file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    /// The file, as it was given (not canonicalized).
    pub file: PathBuf,
    /// 1-based line of the offending node, when known.
    pub line: Option<usize>,
    /// 1-based column of the offending node, when known.
    pub column: Option<usize>,
    /// Dotted path of the node, e.g. `rounds.generate.sampling.stop[0]`; empty for the
    /// whole file.
    pub yaml_path: String,
    /// Lowercase message; things named in it are in backticks.
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "error: {}", self.message)?;
        write!(f, "  --> {}", self.file.display())?;
        match (self.line, self.column) {
            (Some(line), Some(col)) => write!(f, ":{line}:{col}")?,
            (Some(line), None) => write!(f, ":{line}")?,
            _ => {}
        }
        if !self.yaml_path.is_empty() {
            write!(f, "\n   at: {}", self.yaml_path)?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecError {}

/// Every problem found in a pipeline file (validation goes on after the first one).
/// Never empty when returned as an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Errors(pub Vec<SpecError>);

impl Errors {
    /// The errors, in file order where positions are known.
    pub fn iter(&self) -> std::slice::Iter<'_, SpecError> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for Errors {
    /// One block per error, separated by blank lines.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Errors {}

impl IntoIterator for Errors {
    type Item = SpecError;
    type IntoIter = std::vec::IntoIter<SpecError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a Errors {
    type Item = &'a SpecError;
    type IntoIter = std::slice::Iter<'a, SpecError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}
