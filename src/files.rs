//! Modes of what fileflow writes on disk. The data directory holds every job's URL, the API
//! keys' records, the signing and encryption keys and the stored objects: other users of
//! the machine may read none of it, whatever the umask. Directories are 0700 and files 0600
//! (set explicitly after creation, since a umask can only take bits away); `--file-mode`
//! lets a group read the stored objects (and reach them), nothing more.

use std::path::Path;
use std::str::FromStr;

/// The mode of stored objects (`--file-mode`): the owner's read and write, plus any of the
/// group's read and write; never other users'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMode(u32);

impl FileMode {
    /// Owner only: files 0600, directories 0700.
    pub const PRIVATE: Self = Self(0o600);

    /// The mode of files.
    pub fn file_bits(self) -> u32 {
        self.0
    }

    /// The mode of directories: the files' mode, with search (`x`) wherever they may be read.
    pub fn dir_bits(self) -> u32 {
        self.0 | ((self.0 & 0o444) >> 2)
    }
}

impl Default for FileMode {
    fn default() -> Self {
        Self::PRIVATE
    }
}

impl std::fmt::Display for FileMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

impl FromStr for FileMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bits =
            u32::from_str_radix(text.trim(), 8).map_err(|_| format!("{text:?} is not an octal mode like 0640"))?;
        if bits & 0o600 != 0o600 || bits & !0o660 != 0 {
            return Err(format!(
                "{text}: a file mode gives the owner read and write and may add the group's (0600, 0640, 0660); \
                 other users and execute bits are never given"
            ));
        }
        Ok(Self(bits))
    }
}

/// Set `path`'s mode to `bits`.
pub fn set_mode(path: &Path, bits: u32) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(bits))
    }
    #[cfg(not(unix))]
    {
        let _ = (path, bits);
        Ok(())
    }
}

/// Create directory `dir` (and its parents) if missing and give it `mode`'s directory mode.
pub fn create_dir(dir: &Path, mode: FileMode) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    set_mode(dir, mode.dir_bits())
}

/// Give the file `file` under `root` its mode, and every directory between them theirs.
pub fn settle(root: &Path, file: &Path, mode: FileMode) -> std::io::Result<()> {
    set_mode(file, mode.file_bits())?;
    let mut dir = file.parent();
    while let Some(d) = dir {
        if !d.starts_with(root) || d == root {
            break;
        }
        set_mode(d, mode.dir_bits())?;
        dir = d.parent();
    }
    Ok(())
}

/// Make `file` private (0600) if it exists; `Ok` when it does not.
pub fn make_private(file: &Path) -> std::io::Result<()> {
    match set_mode(file, FileMode::PRIVATE.file_bits()) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Create `file` empty and private if missing (so whatever creates it later, such as
/// SQLite, finds it private), and make it private if it exists.
pub fn create_private(file: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(file)?;
    make_private(file)
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn modes_parse_and_only_the_group_may_be_let_in() {
        assert_eq!("0600".parse::<FileMode>().unwrap().dir_bits(), 0o700);
        assert_eq!("640".parse::<FileMode>().unwrap().dir_bits(), 0o750);
        assert_eq!("0660".parse::<FileMode>().unwrap().dir_bits(), 0o770);
        for refused in ["0644", "0400", "0700", "0666", "rw", "0620x"] {
            assert!(refused.parse::<FileMode>().is_err(), "{refused}");
        }
    }

    #[test]
    fn a_settled_file_and_its_directories_get_the_modes() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("bucket/a/b/object");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, b"x").unwrap();
        set_mode(&file, 0o666).unwrap();
        settle(root.path(), &file, FileMode::PRIVATE).unwrap();
        assert_eq!(mode(&file), 0o600);
        for dir in ["bucket", "bucket/a", "bucket/a/b"] {
            assert_eq!(mode(&root.path().join(dir)), 0o700, "{dir}");
        }
        settle(root.path(), &file, "0640".parse().unwrap()).unwrap();
        assert_eq!((mode(&file), mode(&root.path().join("bucket/a"))), (0o640, 0o750));
        let db = root.path().join("db");
        create_private(&db).unwrap();
        assert_eq!(mode(&db), 0o600);
    }
}
