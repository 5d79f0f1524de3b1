//! `juice`, the one binary: argument parsing and glue. Every part of the
//! product lives in a library crate; this crate only turns arguments into
//! library calls and results into tables, JSON and one-sentence errors.

mod debug;
mod dist;
mod docs;
mod fleet;
mod fleet_host;
mod fleet_rollout;
mod fleet_tls;
mod fleet_update;
mod host;
mod images;
mod os;
mod output;
mod progress;
mod run;
mod top;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

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
    /// Re-hash an image's blobs, or every image and blob in the store; with --key, check signatures too.
    Verify {
        image: Option<String>,
        /// A public key that must have signed the image (repeatable).
        #[arg(long = "key", value_name = "FILE", requires = "image")]
        keys: Vec<PathBuf>,
    },
    /// Push a local image (and its signatures) to a registry: REGISTRY/REPO:TAG.
    Push {
        image: String,
        target: String,
        #[command(flatten)]
        registry: dist::RegistryArgs,
    },
    /// Pull an image (and its signatures) from a registry into the local store.
    Pull {
        reference: String,
        #[command(flatten)]
        registry: dist::RegistryArgs,
    },
    /// Make an ed25519 key pair: NAME.key (private) and NAME.pub.
    Keygen { name: PathBuf },
    /// Sign a local image; the signature travels with `juice push`.
    Sign {
        image: String,
        #[arg(long = "key", value_name = "FILE")]
        key: PathBuf,
        /// The repository the signature is for, as hosts will pull it (REGISTRY/REPO;
        /// repeatable; default: the image's own name). It counts for that name only.
        #[arg(long = "identity", value_name = "NAME")]
        identities: Vec<String>,
    },
    /// File a credential for one registry in the auth file (the password from stdin).
    Login(dist::LoginArgs),
    /// Remove a registry's credential from the auth file.
    Logout {
        registry: String,
        #[arg(long = "authfile", value_name = "FILE")]
        authfile: Option<PathBuf>,
    },
    /// Turn a container image into an appliance (optionally pruned to just enough).
    Import(dist::ImportArgs),
    /// Write an image as an OCI archive.
    Export { image: String, file: PathBuf },
    /// Run the host agent: the API on $JUICE_HOME/juice.sock and the reconciler.
    Daemon {
        /// Also serve the API on this TCP address, to mutual-TLS clients only.
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
        /// Certificates for --listen (default: $JUICE_HOME/tls, made by `juice certs`).
        #[arg(long, value_name = "DIR")]
        tls: Option<PathBuf>,
        /// Apply this site file at start (as `juice apply`); an invalid site is reported as
        /// an event and the daemon keeps serving its API.
        #[arg(long, value_name = "FILE")]
        site: Option<PathBuf>,
        #[command(flatten)]
        fleet: fleet::JoinArgs,
    },
    /// Check the host's prerequisites: what each backend needs, what is missing, which package brings it.
    Doctor,
    /// Make a CA, and server and client certificates for remote access with mutual TLS
    /// (`juice certs fleet ...`: the fleet's, for etcd).
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Certs {
        #[arg(required = true)]
        dir: Option<PathBuf>,
        /// Names and addresses the server certificate is valid for (default: localhost, 127.0.0.1).
        #[arg(long = "host")]
        hosts: Vec<String>,
        #[command(subcommand)]
        fleet: Option<fleet_tls::CertsCommand>,
    },
    /// Development mode: an embedded daemon, the site applied, live status and logs; Ctrl-C tears down.
    Up {
        #[arg(short = 'f', long = "file", default_value = "site.toml")]
        file: PathBuf,
    },
    /// Show what applying a site file would change, and why.
    Plan {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Make the host as the site file declares (idempotent).
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// List groups, instances or images.
    Get {
        #[arg(value_enum)]
        what: host::GetKind,
    },
    /// A group's revisions, rollout, instances and recent events.
    Describe {
        #[arg(value_enum)]
        kind: host::DescribeKind,
        name: String,
    },
    /// The event log.
    Events {
        #[arg(long)]
        group: Option<String>,
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// A toolbox beside a running instance: its processes, network and root (read-only at /app).
    Debug(debug::DebugArgs),
    /// An instance's output.
    Logs {
        instance: String,
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// Roll a group back to a kept revision (default: the previous one).
    Rollback {
        group: String,
        #[arg(long)]
        to: Option<u64>,
    },
    /// Delete a group and stop its instances.
    Delete { group: String },
    /// Live cpu, memory, pids, network and restarts per instance and group (`-o json`: one sample).
    Top,
    /// Run one instance of an image in the foreground, outside any group.
    Run(run::RunArgs),
    /// The fleet in etcd: its hosts and controller, and its groups' placement from a fleet file.
    Fleet {
        /// With https:// endpoints: the fleet's CA, this client's certificate and key
        /// (ca.pem, cert.pem, key.pem; default: $JUICE_FLEET_TLS, else $JUICE_HOME/fleet-tls).
        #[arg(long, value_name = "DIR", global = true)]
        tls: Option<PathBuf>,
        #[command(subcommand)]
        command: fleet::FleetCommand,
    },
    /// The host's own OS as an immutable image: build, write a disk, update, roll back, status.
    Os {
        #[command(subcommand)]
        command: os::OsCommand,
    },
    /// Print the completion script for a shell (e.g. `juice completions bash > /etc/bash_completion.d/juice`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the juice(1) man page, or write it and a page per subcommand into a directory.
    Man {
        /// Write juice.1 and juice-SUBCOMMAND.1 here instead of printing juice(1).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// `$JUICE_HOME`, or `/var/lib/juice`.
fn juice_home() -> PathBuf {
    std::env::var_os("JUICE_HOME").map_or_else(|| PathBuf::from("/var/lib/juice"), PathBuf::from)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (format, debug) = (cli.output, cli.debug);
    let result: Result<i32, Box<dyn std::error::Error>> = match cli.command {
        Command::Build { dir, tag, quiet } => images::build(&dir, tag, quiet, format).map(|()| 0),
        Command::Images => images::list(format).map(|()| 0),
        Command::Inspect { image } => images::inspect(&image, format).map(|()| 0),
        Command::Rmi { images } => images::remove(&images).map(|()| 0),
        Command::Gc => images::gc(format).map(|()| 0),
        Command::Verify { image, keys } => images::verify(image.as_deref(), format)
            .and_then(|()| match (&image, keys.is_empty()) {
                (Some(i), false) => dist::verify_signatures(i, &keys),
                _ => Ok(()),
            })
            .map(|()| 0),
        Command::Push {
            image,
            target,
            registry,
        } => dist::push(&image, &target, &registry, format).map(|()| 0),
        Command::Pull {
            reference,
            registry,
        } => dist::pull(&reference, &registry, format).map(|()| 0),
        Command::Keygen { name } => dist::keygen(&name).map(|()| 0),
        Command::Sign {
            image,
            key,
            identities,
        } => dist::sign(&image, &key, &identities).map(|()| 0),
        Command::Login(args) => dist::login(&args).map(|()| 0),
        Command::Logout { registry, authfile } => {
            dist::logout(&registry, authfile.as_deref()).map(|()| 0)
        }
        Command::Import(args) => dist::import_cmd(&args, format).map(|()| 0),
        Command::Export { image, file } => dist::export(&image, &file).map(|()| 0),
        Command::Daemon {
            listen,
            tls,
            site,
            fleet,
        } => host::daemon(listen, tls, site, &fleet).map(|()| 0),
        Command::Doctor => host::doctor(format),
        Command::Certs {
            fleet: Some(command),
            ..
        } => fleet_tls::certs(command).map(|()| 0),
        Command::Certs { dir, hosts, .. } => match dir {
            Some(dir) => host::certs(&dir, &hosts).map(|()| 0),
            None => Err("juice certs: give a directory (or `juice certs fleet ...`)".into()),
        },
        Command::Up { file } => host::up(&file).map(|()| 0),
        Command::Plan { file } => host::plan(&file, format).map(|()| 0),
        Command::Apply { file } => host::apply(&file, format).map(|()| 0),
        Command::Get { what } => host::get(what, format).map(|()| 0),
        Command::Describe { kind, name } => host::describe(kind, &name, format).map(|()| 0),
        Command::Events { group, follow } => {
            host::events(group.as_deref(), follow, format).map(|()| 0)
        }
        Command::Debug(args) => debug::debug(args),
        Command::Logs { instance, follow } => host::logs(&instance, follow).map(|()| 0),
        Command::Rollback { group, to } => host::rollback(&group, to).map(|()| 0),
        Command::Delete { group } => host::delete(&group).map(|()| 0),
        Command::Top => top::top(format).map(|()| 0),
        Command::Run(args) => run::run(args),
        Command::Fleet { tls, command } => fleet::run(command, tls, format).map(|()| 0),
        Command::Os { command } => os::run(command, format).map(|()| 0),
        Command::Completions { shell } => docs::completions(Cli::command(), shell)
            .map(|()| 0)
            .map_err(Into::into),
        Command::Man { dir } => docs::man(Cli::command(), dir.as_deref())
            .map(|()| 0)
            .map_err(Into::into),
    };
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code.max(0)).unwrap_or(u8::MAX)),
        Err(e) => {
            eprintln!("juice: {e}");
            if debug {
                eprintln!("{e:?}");
            }
            // 125, as container runtimes do: Juice itself failed, not the appliance.
            ExitCode::from(125)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("juice").chain(args.iter().copied()))
    }

    /// The error for `args`, which must be clap's for a value outside a closed set.
    fn refused(args: &[&str]) -> String {
        match parse(args) {
            Ok(_) => panic!("juice {args:?} should have been refused"),
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::InvalidValue, "juice {args:?}");
                e.to_string()
            }
        }
    }

    #[test]
    fn the_argument_definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn get_takes_each_kind_in_plural_and_singular() {
        for (words, want) in [
            (["groups", "group"], host::GetKind::Groups),
            (["instances", "instance"], host::GetKind::Instances),
            (["images", "image"], host::GetKind::Images),
        ] {
            for word in words {
                match parse(&["get", word]).map(|c| c.command) {
                    Ok(Command::Get { what }) => assert_eq!(what, want, "get {word}"),
                    _ => panic!("`juice get {word}` should parse"),
                }
            }
        }
    }

    #[test]
    fn a_kind_outside_the_set_is_refused_with_the_possible_values() {
        let e = refused(&["get", "widgets"]);
        assert!(
            e.contains("[possible values: groups, instances, images]"),
            "{e}"
        );
        let e = refused(&["describe", "instance", "web-1"]);
        assert!(e.contains("[possible values: group]"), "{e}");
        assert!(matches!(
            parse(&["describe", "group", "web"]).map(|c| c.command),
            Ok(Command::Describe {
                kind: host::DescribeKind::Group,
                ..
            })
        ));
    }

    #[test]
    fn run_keeps_its_defaults_and_refuses_unknown_isolation_or_network() {
        match parse(&["run", "hello-web"]).map(|c| c.command) {
            Ok(Command::Run(args)) => {
                assert_eq!(args.isolation, run::Isolation::Sandbox);
                assert_eq!(args.network, run::Network::Bridge);
            }
            _ => panic!("`juice run hello-web` should parse"),
        }
        match parse(&["run", "--isolation", "microvm", "--network", "none", "x"]).map(|c| c.command)
        {
            Ok(Command::Run(args)) => {
                assert_eq!(args.isolation, run::Isolation::Microvm);
                assert_eq!(args.network, run::Network::None);
            }
            _ => panic!("`juice run --isolation microvm --network none` should parse"),
        }
        let e = refused(&["run", "--isolation", "vm", "x"]);
        assert!(e.contains("[possible values: sandbox, microvm]"), "{e}");
        let e = refused(&["run", "--network", "host", "x"]);
        assert!(e.contains("[possible values: bridge, none]"), "{e}");
    }

    #[test]
    fn top_takes_json_output() {
        let cli = parse(&["top", "-o", "json"]).expect("`juice top -o json` should parse");
        assert!(matches!(cli.command, Command::Top));
        assert_eq!(cli.output, Format::Json);
        assert!(matches!(
            parse(&["top"]).map(|c| c.command),
            Ok(Command::Top)
        ));
    }

    #[test]
    fn fleet_flags_are_typed_and_labels_need_a_fleet() {
        match parse(&[
            "daemon",
            "--fleet",
            "http://a:2379,http://b:2379",
            "--label",
            "zone=eu-1",
        ])
        .map(|c| c.command)
        {
            Ok(Command::Daemon { fleet, .. }) => {
                let endpoints = fleet.endpoints.expect("--fleet was given");
                assert_eq!(endpoints.urls(), ["http://a:2379", "http://b:2379"]);
                assert_eq!(fleet.labels[0].key, "zone");
                assert_eq!(fleet.lease_secs, 10);
            }
            _ => panic!("`juice daemon --fleet ... --label ...` should parse"),
        }
        let e = parse(&["daemon", "--label", "zone=eu-1"])
            .err()
            .expect("a label without --fleet is refused");
        assert_eq!(e.kind(), ErrorKind::MissingRequiredArgument);
        let e = parse(&["daemon", "--fleet", "http://a:2379", "--label", "zone"])
            .err()
            .expect("a label that is not key=value is refused");
        assert_eq!(e.kind(), ErrorKind::ValueValidation);
        assert!(
            e.to_string().contains("label `zone`: a label is key=value"),
            "{e}"
        );
        for word in ["hosts", "host"] {
            assert!(matches!(
                parse(&["fleet", "get", word]).map(|c| c.command),
                Ok(Command::Fleet {
                    command: fleet::FleetCommand::Get {
                        what: fleet::FleetGetKind::Hosts,
                        endpoints: None
                    },
                    ..
                })
            ));
        }
    }

    #[test]
    fn the_controller_role_needs_a_fleet_and_plan_and_apply_need_a_file() {
        match parse(&["daemon", "--fleet", "http://a:2379", "--fleet-controller"])
            .map(|c| c.command)
        {
            Ok(Command::Daemon { fleet, .. }) => assert!(fleet.controller),
            _ => panic!("`juice daemon --fleet ... --fleet-controller` should parse"),
        }
        match parse(&["daemon", "--site", "/var/lib/juice/site.toml"]).map(|c| c.command) {
            Ok(Command::Daemon { site, .. }) => {
                assert_eq!(site, Some(PathBuf::from("/var/lib/juice/site.toml")));
            }
            _ => panic!("`juice daemon --site FILE` should parse"),
        }
        let e = parse(&["daemon", "--site"])
            .err()
            .expect("--site needs a file");
        assert_eq!(e.kind(), ErrorKind::InvalidValue);
        let e = parse(&["daemon", "--fleet-controller"])
            .err()
            .expect("--fleet-controller without --fleet is refused");
        assert_eq!(e.kind(), ErrorKind::MissingRequiredArgument);
        for verb in ["plan", "apply"] {
            let e = parse(&["fleet", verb])
                .err()
                .expect("plan and apply need -f");
            assert_eq!(e.kind(), ErrorKind::MissingRequiredArgument);
            assert!(parse(&["fleet", verb, "-f", "fleet.toml"]).is_ok());
        }
        for (word, kind) in [
            ("controller", fleet::FleetGetKind::Controller),
            ("assignments", fleet::FleetGetKind::Assignments),
            ("assignment", fleet::FleetGetKind::Assignments),
        ] {
            assert!(matches!(
                parse(&["fleet", "get", word]).map(|c| c.command),
                Ok(Command::Fleet {
                    command: fleet::FleetCommand::Get { what, .. },
                    ..
                }) if what == kind
            ));
        }
    }

    #[test]
    fn certs_keeps_its_directory_and_gains_the_fleets_and_fleet_commands_take_tls() {
        match parse(&["certs", "/tmp/c", "--host", "a"]).map(|c| c.command) {
            Ok(Command::Certs {
                dir: Some(dir),
                hosts,
                fleet: None,
            }) => assert_eq!((dir, hosts), (PathBuf::from("/tmp/c"), vec!["a".into()])),
            _ => panic!("`juice certs DIR --host a` should parse"),
        }
        assert!(parse(&["certs"]).is_err());
        assert!(matches!(
            parse(&["certs", "fleet", "init", "/tmp/ca"]).map(|c| c.command),
            Ok(Command::Certs {
                fleet: Some(fleet_tls::CertsCommand::Fleet {
                    command: fleet_tls::FleetCerts::Init { .. }
                }),
                ..
            })
        ));
        assert!(parse(&["certs", "fleet", "etcd", "/tmp/ca"]).is_err());
        assert!(parse(&["certs", "fleet", "host", "/tmp/ca", "--id", "../x"]).is_err());
        match parse(&["fleet", "get", "hosts", "--tls", "/tmp/t"]).map(|c| c.command) {
            Ok(Command::Fleet { tls, .. }) => assert_eq!(tls, Some(PathBuf::from("/tmp/t"))),
            _ => panic!("`juice fleet get hosts --tls DIR` should parse"),
        }
        match parse(&[
            "daemon",
            "--fleet",
            "https://a:2379",
            "--fleet-tls",
            "/tmp/t",
        ])
        .map(|c| c.command)
        {
            Ok(Command::Daemon { fleet, tls, .. }) => {
                assert_eq!(fleet.fleet_tls, Some(PathBuf::from("/tmp/t")));
                assert_eq!(tls, None);
            }
            _ => panic!("`juice daemon --fleet https://... --fleet-tls DIR` should parse"),
        }
        assert!(parse(&["daemon", "--fleet-tls", "/tmp/t"]).is_err());
        assert!(
            parse(&[
                "fleet",
                "auth",
                "host",
                "0123456789abcdef0123456789abcdef",
                "--controller"
            ])
            .is_ok()
        );
    }

    #[test]
    fn output_formats_and_shells_are_closed_sets_too() {
        let e = refused(&["images", "-o", "yaml"]);
        assert!(e.contains("[possible values: table, json]"), "{e}");
        let e = refused(&["completions", "tcsh"]);
        assert!(e.contains("bash") && e.contains("zsh"), "{e}");
    }
}
