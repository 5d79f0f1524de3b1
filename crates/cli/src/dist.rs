//! Distribution and trust commands: push, pull, keygen, sign, import, export.

use std::path::{Path, PathBuf};

use juice_image::store::Store;
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
    /// Credentials USER:PASSWORD (or JUICE_REGISTRY_USER and JUICE_REGISTRY_PASSWORD).
    #[arg(long = "user", value_name = "USER:PASSWORD")]
    pub user: Option<String>,
    /// Also trust this CA for the registry's certificate (PEM; repeatable; or JUICE_REGISTRY_CA).
    #[arg(long = "ca", value_name = "FILE")]
    pub ca: Vec<PathBuf>,
    /// No progress bars.
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

impl RegistryArgs {
    pub fn options(&self) -> Result<RemoteOptions> {
        let mut o = RemoteOptions::from_env();
        o.insecure.extend(self.insecure.iter().cloned());
        o.ca_files.extend(self.ca.iter().cloned());
        if let Some(u) = &self.user {
            let (user, pass) = u.split_once(':').ok_or("--user takes USER:PASSWORD")?;
            o.credentials = Some((user.to_owned(), pass.to_owned()));
        }
        o.progress = !self.quiet;
        Ok(o)
    }
}

fn store() -> Result<Store> {
    Ok(Store::open(&crate::juice_home())?)
}

pub fn push(image: &str, target: &str, args: &RegistryArgs, format: Format) -> Result {
    let store = store()?;
    let remote = Remote::new(&args.options()?)?;
    let t = remote.push(&store, image, target)?;
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
    let remote = Remote::new(&args.options()?)?;
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

pub fn sign(image: &str, key: &Path) -> Result {
    let store = store()?;
    let record = store.resolve(image)?;
    sign::sign(store.home(), &record.digest, &record.reference, key)?;
    println!(
        "signed {} ({}) with {}; `juice push` carries the signature",
        record.reference,
        record.digest,
        key.display()
    );
    Ok(())
}

/// `juice verify IMAGE --key K...`: the signatures, besides the blobs.
pub fn verify_signatures(image: &str, keys: &[PathBuf]) -> Result {
    let store = store()?;
    let record = store.resolve(image)?;
    let sigs = sign::local(store.home(), &record.digest)?;
    for k in keys {
        let key = sign::load_public(k)?;
        let mut why = Vec::new();
        let ok = sigs.iter().any(|s| match s.check(&record.digest, &key) {
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
        remote: args.registry.options()?,
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
