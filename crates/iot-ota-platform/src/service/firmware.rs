//! Firmware records and their files in the data directory.

use std::path::Path;

use super::{PlatformError, Shared, Upload};
use crate::api::{check_firmware, FirmwareInfo};
use crate::batch::Millis;
use crate::store::FirmwareRow;

impl Shared {
    pub(crate) fn list_firmware(
        &self,
        product: Option<&str>,
    ) -> Result<Vec<FirmwareInfo>, PlatformError> {
        let inner = self.lock();
        Ok(inner
            .store
            .list_firmware(product)?
            .iter()
            .map(|f| f.info(&self.public_url))
            .collect())
    }

    /// Registers an uploaded file (already written at `tmp`, hashed and sized).
    pub(crate) fn add_firmware(
        &self,
        up: Upload,
        now: Millis,
    ) -> Result<FirmwareInfo, PlatformError> {
        let Upload {
            product,
            version,
            name,
            tmp,
            size,
            md5,
            sha256,
            counter,
        } = up;
        let (product, version, name) = (product.as_str(), version.as_str(), name.as_str());
        check_firmware(product, version, name, size, self.max_size)
            .map_err(|m| PlatformError::new(400, m))?;
        if counter.is_some() && self.signing_key.is_none() {
            return Err(PlatformError::new(
                400,
                "counter is for signed manifests: start the platform with a signing key",
            ));
        }
        // The chunk index (delta updates), made before the lock: reading
        // the whole image takes a while.
        let (index_bytes, index_sha256) = make_index(&tmp)?;
        let dir = self.data_dir.join("firmware").join(product).join(version);
        let path = dir.join(name);
        let index_path = dir.join(format!("{name}.idx"));
        let inner = self.lock();
        if inner.store.firmware(product, version)?.is_some() {
            return Err(PlatformError::new(
                409,
                format!("product {product} already has a firmware version {version}"),
            ));
        }
        let stored = std::fs::create_dir_all(&dir)
            .and_then(|_| std::fs::write(&index_path, &index_bytes))
            .and_then(|_| std::fs::rename(&tmp, &path));
        if let Err(e) = stored {
            // No record without its files, and no directory without its record.
            let _ = std::fs::remove_file(&index_path);
            let _ = std::fs::remove_dir(&dir);
            return Err(PlatformError::new(
                500,
                format!("storing {}: {e}", path.display()),
            ));
        }
        let signed = match &self.signing_key {
            Some(key) => {
                let manifest = iot_ota_core::manifest::Manifest {
                    product: product.into(),
                    firmware_version: version.into(),
                    size,
                    sha256: sha256.clone(),
                    counter: counter.unwrap_or(0),
                    index_sha256: Some(index_sha256.clone()),
                };
                let signed = iot_ota_core::manifest::Signed::sign(manifest, &[key])
                    .map_err(|e| PlatformError::new(500, format!("signing the manifest: {e}")))?;
                let fields: serde_json::Map<String, serde_json::Value> =
                    signed.to_fields().into_iter().collect();
                Some(serde_json::Value::Object(fields).to_string())
            }
            None => None,
        };
        let row = FirmwareRow {
            product: product.into(),
            version: version.into(),
            name: name.into(),
            size,
            md5,
            sha256,
            path: path.to_string_lossy().into_owned(),
            created_ms: now,
            counter: signed.as_ref().map(|_| counter.unwrap_or(0)),
            signed,
            index: Some((index_sha256, index_bytes.len() as u64)),
        };
        if !inner.store.insert_firmware(&row)? {
            return Err(PlatformError::new(409, "duplicate version"));
        }
        Ok(row.info(&self.public_url))
    }

    pub(crate) fn delete_firmware(
        &self,
        product: &str,
        version: &str,
    ) -> Result<(), PlatformError> {
        let inner = self.lock();
        let Some(row) = inner.store.firmware(product, version)? else {
            return Err(PlatformError::new(
                404,
                format!("no firmware {version} for product {product}"),
            ));
        };
        if let Some(batch) = inner.store.firmware_in_use(product, version)? {
            return Err(PlatformError::new(
                409,
                format!("firmware {product} {version} is used by running batch {batch}; terminate it first"),
            ));
        }
        inner.store.delete_firmware(product, version)?;
        let _ = std::fs::remove_file(&row.path);
        let _ = std::fs::remove_file(row.index_path());
        if let Some(dir) = Path::new(&row.path).parent() {
            let _ = std::fs::remove_dir(dir);
        }
        Ok(())
    }

    pub(crate) fn firmware_file(
        &self,
        product: &str,
        version: &str,
        name: &str,
    ) -> Result<FirmwareRow, PlatformError> {
        let inner = self.lock();
        match inner.store.firmware(product, version)? {
            Some(row) if row.name == name => Ok(row),
            // Its chunk index: served as a file of its own.
            Some(row) if name.strip_suffix(".idx") == Some(row.name.as_str()) => {
                match row.index.clone() {
                    Some((sha256, size)) => Ok(FirmwareRow {
                        path: row.index_path(),
                        size,
                        sha256,
                        ..row
                    }),
                    None => Err(PlatformError::new(404, "this firmware has no chunk index")),
                }
            }
            _ => Err(PlatformError::new(404, "no such firmware file")),
        }
    }
}

/// The chunk index of the image at `path` (delta updates: content-defined
/// chunks, each with its SHA-256; `iot_ota_core::delta`), encoded, and its
/// SHA-256 in hex.
fn make_index(path: &Path) -> Result<(Vec<u8>, String), PlatformError> {
    use iot_ota_core::delta::{chunk, Index, Params};
    let fail = |e: String| PlatformError::new(500, format!("indexing {}: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let params = Params::default();
    let chunks = chunk(params, &mut reader).map_err(fail)?;
    let bytes = Index::build(params, &chunks).encode();
    let sha256 = iot_ota_core::digest::digest_hex(iot_ota_core::SignMethod::Sha256, &bytes);
    Ok((bytes, sha256))
}
