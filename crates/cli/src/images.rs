//! `juice build`, `images`, `inspect`, `rmi`, `gc`, `verify`: the local store.

use std::path::Path;

use juice_image::build::{self, BuildOptions};
use juice_image::manifest::Probe;
use juice_image::store::Store;

use crate::output::{self, Format};

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

fn store() -> Result<Store> {
    Ok(Store::open(&crate::juice_home())?)
}

pub fn build(dir: &Path, tag: Option<String>, quiet: bool, format: Format) -> Result {
    let store = store()?;
    let outcome = build::build(&store, dir, &BuildOptions { tag })?;
    if quiet {
        println!("{}", outcome.digest);
    } else if format == Format::Json {
        output::json(&outcome)?;
    } else {
        println!(
            "{} {} {} ({} entries, {} of files{})",
            if outcome.cached { "unchanged" } else { "built" },
            outcome.reference,
            outcome.digest,
            outcome.entries,
            output::size(outcome.sizes.total()),
            if outcome.cached {
                ", inputs identical to an earlier build"
            } else {
                ""
            }
        );
    }
    Ok(())
}

pub fn list(format: Format) -> Result {
    let records = store()?.list()?;
    if format == Format::Json {
        return output::json(&records);
    }
    let mut t = output::table(["IMAGE", "DIGEST", "SIZE"]);
    for r in &records {
        t.add_row([r.reference.clone(), r.digest.short(), output::size(r.size)]);
    }
    println!("{t}");
    Ok(())
}

pub fn inspect(reference: &str, format: Format) -> Result {
    let store = store()?;
    let image = store.image(reference)?;
    let layout = format!(
        "oci:{}:{}",
        store.layout().display(),
        image.record.reference
    );
    let layer_size: u64 = image.manifest.layers().iter().map(|l| l.size()).sum();
    if format == Format::Json {
        return output::json(&serde_json::json!({
            "reference": image.record.reference,
            "digest": image.record.digest,
            "size": image.record.size,
            "layer_size": layer_size,
            "layout": layout,
            "appliance": image.appliance,
            "oci_manifest": image.manifest,
            "oci_config": image.config,
        }));
    }
    println!("Image:      {}", image.record.reference);
    println!("Digest:     {}", image.record.digest);
    println!("Layout:     {layout}");
    let Some(a) = image.appliance else {
        println!(
            "(not a Juice appliance: it carries no {} label)",
            juice_image::appliance::LABEL
        );
        return Ok(());
    };
    let m = &a.manifest;
    println!("Command:    {}", m.run.command.args().join(" "));
    println!("User:       {}", m.run.user);
    if !m.run.env.is_empty() {
        let env: Vec<String> = m.run.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("Env:        {}", env.join(" "));
    }
    if !m.run.ports.is_empty() {
        let ports: Vec<String> = m.run.ports.iter().map(|p| p.get().to_string()).collect();
        println!("Ports:      {}", ports.join(", "));
    }
    let r = &m.resources;
    println!(
        "Resources:  cpus {}, memory {}, pids {}",
        r.cpus.map_or("unlimited".into(), |c| c.get().to_string()),
        r.memory.map_or("unlimited".into(), |s| output::size(s.0)),
        r.pids.map_or("unlimited".into(), |p| p.to_string()),
    );
    if let Some(h) = &m.health {
        let probe = match &h.probe {
            Probe::Http { path, port } => format!("http GET :{}{path}", port.get()),
            Probe::Tcp { port } => format!("tcp :{}", port.get()),
        };
        println!(
            "Health:     {probe} every {:?}, {} retries",
            h.interval, h.retries
        );
    }
    for v in &m.volumes {
        println!("Volume:     {} at {}", v.name, v.path);
    }
    println!();
    let s = a.sizes;
    let mut t = output::table(["CONTENT", "SIZE"]);
    t.add_row(["binaries".to_owned(), output::size(s.binaries)]);
    t.add_row(["libraries".to_owned(), output::size(s.libraries)]);
    t.add_row(["files".to_owned(), output::size(s.files)]);
    t.add_row(["generated".to_owned(), output::size(s.generated)]);
    t.add_row(["total (uncompressed)".to_owned(), output::size(s.total())]);
    t.add_row(["layer (gzip)".to_owned(), output::size(layer_size)]);
    println!("{t}\n");
    println!("Closure (each ELF object and the libraries it needs):");
    for (object, libs) in &a.closure {
        println!("  {object}");
        for l in libs {
            println!("    -> {l}");
        }
    }
    Ok(())
}

pub fn remove(references: &[String]) -> Result {
    let store = store()?;
    for r in references {
        let record = store.untag(r)?;
        println!("untagged {} ({})", record.reference, record.digest);
    }
    Ok(())
}

pub fn gc(format: Format) -> Result {
    let store = store()?;
    let report = store.gc()?;
    // What was derived from removed images: microVM root disks, signatures.
    let vm_artefacts = juice_microvm::artefacts::gc(store.home(), 30);
    let signatures = juice_registry::sign::gc(&store);
    if format == Format::Json {
        let mut v = serde_json::to_value(&report)?;
        v["vm_artefacts_removed"] = vm_artefacts.into();
        v["signatures_removed"] = signatures.into();
        return output::json(&v);
    }
    println!(
        "removed {} blobs ({}), {} temp files, {} root filesystems, {} microVM artefacts, {} signature files",
        report.blobs_removed,
        output::size(report.bytes_freed),
        report.temp_files_removed,
        report.rootfs_removed,
        vm_artefacts,
        signatures
    );
    Ok(())
}

pub fn verify(reference: Option<&str>, format: Format) -> Result {
    let store = store()?;
    let records = match reference {
        Some(r) => vec![store.verify_image(r)?],
        None => {
            let mut ok = Vec::new();
            for r in store.list()? {
                ok.push(store.verify_image(&r.reference)?);
            }
            let blobs = store.verify_all_blobs()?;
            if format == Format::Table {
                println!("{blobs} blobs re-hashed");
            }
            ok
        }
    };
    if format == Format::Json {
        return output::json(&records);
    }
    for r in records {
        println!("ok {} {}", r.reference, r.digest);
    }
    Ok(())
}
