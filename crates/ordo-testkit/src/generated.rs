//! Files generated from the code and committed (the contracts in `contracts/`): a test holds
//! each to what the code generates now. With `ORDO_WRITE_CONTRACTS=1` (and never in CI, where
//! `CI` is set) it writes the stale ones again, and still fails: the change is to be looked at
//! and committed, not passed over.

use std::path::{Path, PathBuf};

/// Generated files held to what the code generates.
pub struct GeneratedFiles {
    rewrite: bool,
    stale: Vec<PathBuf>,
}

impl Default for GeneratedFiles {
    fn default() -> Self {
        Self {
            rewrite: std::env::var("ORDO_WRITE_CONTRACTS").as_deref() == Ok("1")
                && std::env::var_os("CI").is_none(),
            stale: Vec::new(),
        }
    }
}

impl GeneratedFiles {
    /// Compares `file` with `generated`; a stale one is written again when asked for.
    pub fn hold(&mut self, file: &Path, generated: &str) {
        let committed = std::fs::read_to_string(file).unwrap_or_default();
        if committed != generated {
            if self.rewrite {
                std::fs::create_dir_all(file.parent().expect("a file has a directory"))
                    .expect("the directory can be made");
                std::fs::write(file, generated).expect("the file can be written");
            }
            self.stale.push(file.to_owned());
        }
    }

    /// Fails when any file held was stale, saying how to write them again (`command`).
    pub fn assert_fresh(self, command: &str) {
        assert!(
            self.stale.is_empty(),
            "{} file(s) differ from what the code generates: {:?}; {}",
            self.stale.len(),
            self.stale,
            if self.rewrite {
                "written again now: look at the change and commit it".to_owned()
            } else {
                format!("run `ORDO_WRITE_CONTRACTS=1 {command}`")
            }
        );
    }
}
