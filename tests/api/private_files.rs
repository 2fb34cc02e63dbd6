//! What fileflow keeps on disk is its user's alone: the data directory and every directory
//! under it 0700, the database, its WAL, the keys and the stored objects 0600 (the suite
//! runs with the usual umask 022, which would leave them readable by every user);
//! `--file-mode` lets a group read the objects.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use fileflow::auth::KeyLimits;

use crate::helpers::{Origin, TestApp, spawn_app_with, store_links};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Every directory and file under `dir` (itself included), with its mode.
fn modes(dir: &Path) -> Vec<(PathBuf, bool, u32)> {
    let mut out = vec![(dir.to_owned(), true, mode(dir))];
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(modes(&path));
        } else {
            out.push((path.clone(), false, mode(&path)));
        }
    }
    out
}

/// Store a small object (one write), a larger one (a staged multipart write) and one
/// under nested directories, and create a key.
async fn fill(app: &TestApp, origin: &Origin) {
    for (path, key) in [("/file/5000?seed=1", "small.bin"), ("/file/3145728?seed=2", "a/b/c/large.bin")] {
        let id = app.submit(&origin.url(path), &app.bucket, key).await;
        assert_eq!(app.finished(&id).await["status"], "completed");
    }
    app.create_key("admin", &[], KeyLimits::default()).await;
}

#[tokio::test]
async fn everything_under_the_data_dir_is_private_to_its_user() {
    if store_links() {
        return; // Objects are not on this disk.
    }
    let origin = Origin::start().await;
    let app = spawn_app_with(|s| s.data.data_dir = s.data.data_dir.join("fresh")).await;
    fill(&app, &origin).await;
    let data_dir = app.settings.data.data_dir.clone();
    let found = modes(&data_dir);
    for name in ["fileflow.db", "fileflow.db-wal", "signing.key", "encryption.key", "objects"] {
        assert!(found.iter().any(|(p, ..)| p == &data_dir.join(name)), "no {name} in {found:?}");
    }
    assert!(found.iter().any(|(p, ..)| p.ends_with("a/b/c/large.bin")));
    for (path, is_dir, mode) in &found {
        let expected = if *is_dir { 0o700 } else { 0o600 };
        assert_eq!(*mode, expected, "{} is {mode:o}", path.display());
    }
    app.stop().await;
}

#[tokio::test]
async fn file_mode_lets_the_group_read_the_objects_and_nothing_else() {
    if store_links() {
        return;
    }
    let origin = Origin::start().await;
    let app = spawn_app_with(|s| {
        s.data.data_dir = s.data.data_dir.join("shared");
        s.data.file_mode = "0640".parse().unwrap();
    })
    .await;
    fill(&app, &origin).await;
    let data_dir = app.settings.data.data_dir.clone();
    let objects = data_dir.join("objects");
    for (path, is_dir, mode) in modes(&data_dir) {
        let expected = match (path.starts_with(&objects), is_dir) {
            (true, true) => 0o750,
            (true, false) => 0o640,
            (false, true) if path == data_dir => 0o750,
            (false, true) => 0o700,
            (false, false) => 0o600,
        };
        assert_eq!(mode, expected, "{} is {mode:o}", path.display());
    }
    app.stop().await;
}
