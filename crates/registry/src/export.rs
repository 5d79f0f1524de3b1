//! `juice export`: an image as an OCI archive (a tar of an OCI image layout
//! holding just this image), which skopeo, podman, containerd and Juice's own
//! import read. Deterministic: the same image gives the same archive bytes.

use std::path::Path;

use juice_image::store::{REF_NAME, Store, from_oci};

use crate::{RegistryError, io_err};

/// Writes `image` to `file` (through a temp file renamed into place); returns the bytes written.
pub fn export(store: &Store, image: &str, file: &Path) -> Result<u64, RegistryError> {
    let img = store.image(image)?;
    let name = img.record.reference.clone();
    let manifest = store.read_blob(&name, &img.record.digest)?;
    let tmp = file.with_extension(format!("tmp-{}", std::process::id()));
    let out = std::fs::File::create(&tmp).map_err(io_err("create", &tmp))?;
    let result = (|| {
        let mut tar = tar::Builder::new(std::io::BufWriter::new(out));
        let mut add = |path: &str, data: &[u8]| -> Result<(), RegistryError> {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut h, path, data)
                .map_err(io_err("write", &tmp))
        };
        add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        // The tag inside the archive: the image's tag part (`oci-archive:FILE:TAG`).
        let tag = name
            .rsplit_once(':')
            .map(|(_, t)| t)
            .filter(|t| !t.contains('/'))
            .unwrap_or("latest");
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": img.record.digest.to_string(),
                "size": manifest.len(),
                "annotations": { REF_NAME: tag },
            }],
        });
        add(
            "index.json",
            &serde_json::to_vec(&index).map_err(|e| RegistryError::Invalid(e.to_string()))?,
        )?;
        add(
            &format!("blobs/sha256/{}", img.record.digest.hex()),
            &manifest,
        )?;
        for d in std::iter::once(img.manifest.config().clone())
            .chain(img.manifest.layers().iter().cloned())
        {
            let digest = from_oci(d.digest()).map_err(RegistryError::Invalid)?;
            let bytes = store.read_blob(&name, &digest)?;
            add(&format!("blobs/sha256/{}", digest.hex()), &bytes)?;
        }
        let w = tar.into_inner().map_err(io_err("write", &tmp))?;
        let f = w
            .into_inner()
            .map_err(|e| io_err("write", &tmp)(e.into_error()))?;
        f.sync_all().map_err(io_err("sync", &tmp))?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, file).map_err(io_err("rename", &tmp))?;
    Ok(std::fs::metadata(file).map(|m| m.len()).unwrap_or(0))
}
