//! Distribution and trust commands: push, pull, keygen, sign, import, export.

use std::path::{Path, PathBuf};

use juice_image::store::Store;
use juice_registry::auth::{self, Credential};
use juice_registry::import::{ImportOptions, import};
use juice_registry::remote::{Remote, RemoteOptions};
use juice_registry::sign;

use crate::output::{self, Format};

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

/// How to reach a registry, from the command line and the environment.
#[derive(clap::Args, Clone, Default)]
pub struct RegistryArgs {
    /// Speak plain HTTP to this registry (HOST[:PORT]; repeatable). Everything else is HTTPS.
    #[arg(long = "insecure", value_name = "HOST")]
    pub insecure: Vec<String>,
    /// A user name for this registry, with the password on stdin (--password-stdin).
    #[arg(long = "user", value_name = "USER")]
    pub user: Option<String>,
    /// Read the password for --user from stdin (never from the command line).
    #[arg(long = "password-stdin", requires = "user")]
    pub password_stdin: bool,
    /// The auth file (default: $REGISTRY_AUTH_FILE, else $JUICE_HOME/auth.json; see `juice login`).
    #[arg(long = "authfile", value_name = "FILE")]
    pub authfile: Option<PathBuf>,
    /// Also trust this CA for the registry's certificate (PEM; repeatable; or JUICE_REGISTRY_CA).
    #[arg(long = "ca", value_name = "FILE")]
    pub ca: Vec<PathBuf>,
    /// Refuse an image whose blobs exceed SIZE (together, or any one; e.g. 500M; default 8G).
    #[arg(long = "max-image-size", value_name = "SIZE", value_parser = juice_registry::remote::parse_size)]
    pub max_image_size: Option<u64>,
    /// No progress bars.
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

impl RegistryArgs {
    /// The options for talking to the registry of `reference` (a `--user` credential is for it only).
    pub fn options(&self, reference: &str) -> Result<RemoteOptions> {
        let home = crate::juice_home();
        let mut o = RemoteOptions::from_env(&home)?;
        o.insecure.extend(self.insecure.iter().cloned());
        o.ca_files.extend(self.ca.iter().cloned());
        if let Some(f) = &self.authfile {
            o.auth_file = Some(f.clone());
        }
        if let Some(user) = &self.user {
            if user.contains(':') {
                return Err(
                    "--user takes only the user name: a password on the command line is \
                            visible to every user in the process list (use --password-stdin, \
                            or `juice login REGISTRY`)"
                        .into(),
                );
            }
            if !self.password_stdin {
                return Err(
                    "--user needs --password-stdin: the password is read from stdin".into(),
                );
            }
            let registry = juice_registry::reference::parse(reference)?;
            let password = read_secret("Password: ")?;
            o.extra_credentials.push((
                juice_registry::reference::registry(&registry),
                Credential {
                    username: user.clone(),
                    password,
                },
            ));
        }
        if self.max_image_size.is_some() {
            o.max_image_bytes = self.max_image_size;
        }
        o.progress = crate::progress::reporter(self.quiet);
        Ok(o)
    }
}

/// A secret from stdin: prompted for, without echo, on a terminal; else its first line.
fn read_secret(prompt: &str) -> Result<String> {
    use std::io::{BufRead, IsTerminal};
    use std::os::fd::AsFd;
    let stdin = std::io::stdin();
    let mut line = String::new();
    if stdin.is_terminal() {
        use nix::sys::termios::{LocalFlags, SetArg, tcgetattr, tcsetattr};
        eprint!("{prompt}");
        let fd = stdin.as_fd();
        let old = tcgetattr(fd)?;
        let mut quiet = old.clone();
        quiet.local_flags.remove(LocalFlags::ECHO);
        tcsetattr(fd, SetArg::TCSANOW, &quiet)?;
        let read = stdin.lock().read_line(&mut line);
        let _ = tcsetattr(fd, SetArg::TCSANOW, &old);
        eprintln!();
        read?;
    } else {
        stdin.lock().read_line(&mut line)?;
    }
    let secret = line.trim_end_matches(['\n', '\r']).to_owned();
    if secret.is_empty() {
        return Err("no password on stdin".into());
    }
    Ok(secret)
}

#[derive(clap::Args)]
pub struct LoginArgs {
    /// The registry, HOST[:PORT].
    pub registry: String,
    /// The user name; the password is read from stdin (prompted for on a terminal).
    #[arg(short = 'u', long = "username")]
    pub username: String,
    /// Accepted for docker's sake: the password always comes from stdin.
    #[arg(long = "password-stdin")]
    pub password_stdin: bool,
    /// Speak plain HTTP to this registry (HOST[:PORT]; repeatable).
    #[arg(long = "insecure", value_name = "HOST")]
    pub insecure: Vec<String>,
    /// Also trust this CA for the registry's certificate (PEM; repeatable).
    #[arg(long = "ca", value_name = "FILE")]
    pub ca: Vec<PathBuf>,
    /// The auth file to write (default: $REGISTRY_AUTH_FILE, else $JUICE_HOME/auth.json).
    #[arg(long = "authfile", value_name = "FILE")]
    pub authfile: Option<PathBuf>,
}

/// `juice login`: checks the credential against the registry, then files it for that registry only.
pub fn login(args: &LoginArgs) -> Result {
    let home = crate::juice_home();
    let path = auth::auth_file_path(args.authfile.as_deref(), &home);
    let credential = Credential {
        username: args.username.clone(),
        password: read_secret("Password: ")?,
    };
    let mut o = RemoteOptions::from_env(&home)?;
    o.insecure.extend(args.insecure.iter().cloned());
    o.ca_files.extend(args.ca.iter().cloned());
    // Only this credential: the check must prove it, not one already in the file.
    o.auth_file = None;
    o.extra_credentials = vec![(args.registry.clone(), credential.clone())];
    Remote::new(&o)?.check_login(&args.registry)?;
    auth::login(&path, &args.registry, &credential)?;
    println!(
        "logged in to {}; the credential is in {} (mode 0600) and goes to that registry only",
        args.registry,
        path.display()
    );
    Ok(())
}

/// `juice logout REGISTRY`.
pub fn logout(registry: &str, authfile: Option<&Path>) -> Result {
    let path = auth::auth_file_path(authfile, &crate::juice_home());
    if auth::logout(&path, registry)? {
        println!(
            "removed the credential for {registry} from {}",
            path.display()
        );
        Ok(())
    } else {
        Err(format!("{} has no credential for {registry}", path.display()).into())
    }
}

fn store() -> Result<Store> {
    Ok(Store::open(&crate::juice_home())?)
}

pub fn push(image: &str, target: &str, args: &RegistryArgs, format: Format) -> Result {
    let store = store()?;
    let remote = Remote::new(&args.options(target)?)?;
    let t = remote.push(&store, image, target)?;
    if t.signatures_for_target == Some(0) {
        eprintln!(
            "juice: note: no signature of {image} is for {target}'s repository, so a host whose \
             policy covers it will refuse it; sign it for that name with \
             `juice sign {image} --key KEY --identity {target}`"
        );
    }
    if format == Format::Json {
        return output::json(&t);
    }
    println!(
        "pushed {} as {} ({} blob(s), {} bytes sent, {} already there{})",
        image,
        t.reference,
        t.moved,
        t.moved_bytes,
        t.skipped,
        if t.signatures > 0 {
            format!(", {} signature(s)", t.signatures)
        } else {
            String::new()
        }
    );
    println!("{}", t.digest);
    Ok(())
}

pub fn pull(reference: &str, args: &RegistryArgs, format: Format) -> Result {
    let store = store()?;
    let remote = Remote::new(&args.options(reference)?)?;
    let t = remote.pull(&store, reference)?;
    if format == Format::Json {
        return output::json(&t);
    }
    println!(
        "pulled {} ({} blob(s), {} bytes fetched, {} already here, {} signature(s))",
        t.reference, t.moved, t.moved_bytes, t.skipped, t.signatures
    );
    println!("{}", t.digest);
    Ok(())
}

pub fn keygen(prefix: &Path) -> Result {
    let (private, public) = sign::keygen(prefix)?;
    println!("private key {} (keep it secret)", private.display());
    println!(
        "public key  {} (give it to the hosts' policy.toml)",
        public.display()
    );
    Ok(())
}

/// Signs `image` for each of `identities` (default: its own name); a signature counts only
/// for the repository it names.
pub fn sign(image: &str, key: &Path, identities: &[String]) -> Result {
    let store = store()?;
    let record = store.resolve(image)?;
    let names = if identities.is_empty() {
        vec![record.reference.clone()]
    } else {
        identities.to_vec()
    };
    for name in &names {
        let s = sign::sign(store.home(), &record.digest, name, key)?;
        println!(
            "signed {} ({}) for {} with {}; `juice push` carries the signature",
            record.reference,
            record.digest,
            s.identity()?,
            key.display()
        );
    }
    Ok(())
}

/// `juice verify IMAGE --key K...`: the signatures, besides the blobs.
pub fn verify_signatures(image: &str, keys: &[PathBuf]) -> Result {
    let store = store()?;
    let record = store.resolve(image)?;
    let identity = juice_registry::name::normalise(&record.reference)?;
    let sigs = sign::local(store.home(), &record.digest)?;
    for k in keys {
        let key = sign::load_public(k)?;
        let mut why = Vec::new();
        let ok = sigs
            .iter()
            .any(|s| match s.check_for(&record.digest, &identity, &key) {
                Ok(()) => true,
                Err(e) => {
                    why.push(e);
                    false
                }
            });
        if !ok {
            return Err(format!(
                "image {} is not signed by {}: {}",
                record.reference,
                k.display(),
                if sigs.is_empty() {
                    "it has no signature".to_owned()
                } else {
                    why.join("; ")
                }
            )
            .into());
        }
        println!("ok {} signed by {}", record.reference, k.display());
    }
    match juice_registry::policy::enforce(&store, image)? {
        juice_registry::policy::Verdict::NoPolicy => {}
        v => println!(
            "ok {} may run under this host's policy ({v:?})",
            record.reference
        ),
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct ImportArgs {
    /// A `docker save` archive, an OCI layout (DIR or DIR:TAG), an OCI archive, or a registry reference.
    pub source: String,
    /// NAME:VERSION of the appliance.
    #[arg(short = 't', long = "tag")]
    pub tag: String,
    /// Keep only the entrypoint, --keep paths and their ELF closure.
    #[arg(long)]
    pub prune: bool,
    /// A path (file or directory) in the image to keep when pruning (repeatable).
    #[arg(long = "keep", value_name = "PATH")]
    pub keep: Vec<PathBuf>,
    /// Replace the image's entrypoint and command (the words after --).
    #[arg(last = true)]
    pub command: Vec<String>,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

pub fn import_cmd(args: &ImportArgs, format: Format) -> Result {
    let store = store()?;
    let opts = ImportOptions {
        tag: args.tag.clone(),
        prune: args.prune,
        keep: args.keep.clone(),
        command: (!args.command.is_empty()).then(|| args.command.clone()),
        remote: args.registry.options(&args.source)?,
    };
    let (report, _) = import(&store, &args.source, &opts)?;
    if format == Format::Json {
        return output::json(&report);
    }
    println!("imported {} as {}", args.source, report.reference);
    println!("{}", report.digest);
    println!(
        "command {:?} as {}; {} layer(s) flattened",
        report.command, report.user, report.layers
    );
    println!(
        "kept {} of {} files, {} of {} bytes",
        report.kept_files, report.files, report.kept_bytes, report.bytes
    );
    if !report.dropped.is_empty() {
        println!("dropped, by directory:");
        for (dir, bytes) in &report.dropped {
            println!("  {bytes:>12}  {dir}");
        }
    }
    if !report.setid_dropped.is_empty() {
        println!(
            "setuid/setgid bits dropped: {}",
            report.setid_dropped.join(" ")
        );
    }
    println!("manifest (for `juice build`):\n{}", report.manifest);
    Ok(())
}

pub fn export(image: &str, file: &Path) -> Result {
    let store = store()?;
    let bytes = juice_registry::export::export(&store, image, file)?;
    println!(
        "exported {image} to {} ({bytes} bytes; oci-archive:{})",
        file.display(),
        file.display()
    );
    Ok(())
}
