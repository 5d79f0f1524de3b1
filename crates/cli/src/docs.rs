//! `juice completions SHELL` and `juice man`: shell completions and man pages,
//! generated from the same argument definitions that parse the command line,
//! so they cannot drift from it.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Why a completion script or man page could not be written.
#[derive(Debug, thiserror::Error)]
pub enum DocsError {
    #[error("cannot write to standard output: {0}")]
    Stdout(#[source] std::io::Error),
    #[error("cannot write the man pages to {dir}: {source}")]
    ManDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Prints the completion script for `shell`.
pub fn completions(mut cmd: clap::Command, shell: clap_complete::Shell) -> Result<(), DocsError> {
    // Into memory first: clap_complete panics on a failed write (a closed pipe),
    // and a failed write deserves an error.
    let mut script = Vec::new();
    let name = cmd.get_name().to_owned();
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    write_stdout(&script)
}

/// Prints juice(1), or writes it and one page per subcommand (juice-build(1), ...) into `dir`.
pub fn man(cmd: clap::Command, dir: Option<&Path>) -> Result<(), DocsError> {
    // `juice help` is `--help` again, and has no page of its own to point to.
    let cmd = cmd.disable_help_subcommand(true);
    let Some(dir) = dir else {
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd)
            .render(&mut page)
            .map_err(DocsError::Stdout)?;
        return write_stdout(&page);
    };
    let in_dir = |source| DocsError::ManDir {
        dir: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(in_dir)?;
    let pages = 1 + cmd.get_subcommands().filter(|s| !s.is_hide_set()).count();
    clap_mangen::generate_to(cmd, dir).map_err(in_dir)?;
    println!("wrote {pages} man pages to {}", dir.display());
    Ok(())
}

fn write_stdout(bytes: &[u8]) -> Result<(), DocsError> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(DocsError::Stdout)
}
