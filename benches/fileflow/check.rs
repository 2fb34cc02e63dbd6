//! Exact bytes: what a runner stored, hashed, to compare with the source's SHA-256.

use std::io::Read as _;
use std::path::Path;

use fileflow::domain::{BucketName, ObjectKey};
use fileflow::storage::ObjectStore;
use futures::StreamExt;
use sha2::{Digest, Sha256};

/// The SHA-256 of the file at `path`, in hex.
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let (mut hasher, mut buffer) = (Sha256::new(), vec![0; 1 << 20]);
    loop {
        match file.read(&mut buffer)? {
            0 => return Ok(hex::encode(hasher.finalize())),
            n => hasher.update(&buffer[..n]),
        }
    }
}

/// The SHA-256 of the object `bucket/key`, read back through `store`, in hex.
pub async fn stored_sha256(store: &dyn ObjectStore, bucket: &str, key: &str) -> Result<String, String> {
    let bucket = BucketName::parse(bucket).map_err(|e| e.to_string())?;
    let key = ObjectKey::parse(key).map_err(|e| e.to_string())?;
    let mut body = store.get(&bucket, &key).await.map_err(|e| e.to_string())?.body;
    let mut hasher = Sha256::new();
    while let Some(chunk) = body.next().await {
        hasher.update(&chunk.map_err(|e| e.to_string())?);
    }
    Ok(hex::encode(hasher.finalize()))
}
