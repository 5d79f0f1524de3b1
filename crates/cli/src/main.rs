//! `juice`, the one binary: argument parsing and glue. Every part of the
//! product lives in a library crate; this crate only turns arguments into
//! library calls and results into tables, JSON and one-sentence errors.

mod images;
mod output;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use output::Format;

#[derive(Parser)]
#[command(
    name = "juice",
    version,
    about = "Just enough OS: build, verify and run immutable appliances"
)]
struct Cli {
    /// Output format of listing commands.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    /// Print the full error detail.
    #[arg(long, global = true)]
    debug: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the appliance described by DIR/juice.toml into the local store.
    Build {
        /// The directory holding juice.toml.
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Tag the image NAME:VERSION instead of the manifest's name and version.
        #[arg(short = 't', long = "tag")]
        tag: Option<String>,
        /// Print only the image digest.
        #[arg(short = 'q', long)]
        quiet: bool,
    },
    /// List the images in the local store.
    Images,
    /// Show an image's manifest, sizes and library closure.
    Inspect { image: String },
    /// Remove image tags (blobs go with the next `juice gc`).
    Rmi {
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Remove blobs, temp files and root filesystems no image refers to.
    Gc,
    /// Re-hash an image's blobs, or every image and blob in the store.
    Verify { image: Option<String> },
    /// Run one instance of an image in the foreground, outside any group.
    Run {
        image: String,
        /// Instance name (default: the appliance name and a random suffix).
        #[arg(long)]
        name: Option<String>,
        /// Publish a port: HOST:CONTAINER or IP:HOST:CONTAINER (repeatable).
        #[arg(short = 'p', long = "publish")]
        publish: Vec<String>,
        /// sandbox (shared kernel) or microvm (own kernel).
        #[arg(long, default_value = "sandbox")]
        isolation: String,
        /// bridge (an address on juice0, default-deny between instances) or none (loopback only).
        #[arg(long, default_value = "bridge")]
        network: String,
        /// Do not create a cgroup (no limits).
        #[arg(long)]
        no_cgroup: bool,
        /// Run in a user namespace: root inside is this host uid (and the 65535 after it).
        #[arg(long, value_name = "HOST_UID")]
        userns: Option<u32>,
        /// Print nothing but the appliance's output.
        #[arg(short = 'q', long)]
        quiet: bool,
        /// Seconds between SIGTERM and SIGKILL on Ctrl-C.
        #[arg(long, default_value_t = 10)]
        grace: u64,
        /// Arguments that replace the command's own (the program stays the manifest's).
        #[arg(last = true)]
        args: Vec<String>,
    },
}

/// `$JUICE_HOME`, or `/var/lib/juice`.
fn juice_home() -> PathBuf {
    std::env::var_os("JUICE_HOME").map_or_else(|| PathBuf::from("/var/lib/juice"), PathBuf::from)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Run {
        image,
        name,
        publish,
        isolation,
        network,
        no_cgroup,
        userns,
        quiet,
        grace,
        args: extra,
    } = cli.command
    {
        let args = run::RunArgs {
            image,
            name,
            publish,
            isolation,
            network,
            no_cgroup,
            userns,
            quiet,
            grace: std::time::Duration::from_secs(grace),
            args: extra,
        };
        return match run::run(args) {
            Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
            Err(e) => {
                eprintln!("juice: {e}");
                if cli.debug {
                    eprintln!("{e:?}");
                }
                ExitCode::from(125)
            }
        };
    }
    let result = match cli.command {
        Command::Build { dir, tag, quiet } => images::build(&dir, tag, quiet, cli.output),
        Command::Images => images::list(cli.output),
        Command::Inspect { image } => images::inspect(&image, cli.output),
        Command::Rmi { images } => images::remove(&images),
        Command::Gc => images::gc(cli.output),
        Command::Verify { image } => images::verify(image.as_deref(), cli.output),
        Command::Run { .. } => unreachable!("handled above"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("juice: {e}");
            if cli.debug {
                eprintln!("{e:?}");
            }
            ExitCode::FAILURE
        }
    }
}
