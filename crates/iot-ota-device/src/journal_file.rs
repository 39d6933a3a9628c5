//! The upgrade journal on disk: [`iot_ota_core::journal`]'s store as a file
//! in the device's state directory, replaced atomically
//! ([`crate::fsutil::write_atomic`]).

use std::io;
use std::path::{Path, PathBuf};

use iot_ota_core::journal::{Journal, JournalError, JournalStore};

use crate::fsutil;

/// The journal file, `DIR/journal` by convention.
#[derive(Debug, Clone)]
pub struct FileJournal {
    path: PathBuf,
}

impl FileJournal {
    /// The journal of the state directory `dir`: `dir/journal`.
    pub fn in_dir(dir: impl AsRef<Path>) -> FileJournal {
        FileJournal {
            path: dir.as_ref().join("journal"),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn store_error(path: &Path, what: &str, e: io::Error) -> JournalError {
    JournalError::Store(format!("{what} {}: {e}", path.display()))
}

impl JournalStore for FileJournal {
    fn load(&mut self) -> Result<Option<Journal>, JournalError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => Journal::decode(&bytes).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(store_error(&self.path, "reading", e)),
        }
    }

    fn save(&mut self, journal: &Journal) -> Result<(), JournalError> {
        fsutil::write_atomic(&self.path, &journal.encode())
            .map_err(|e| store_error(&self.path, "writing", e))
    }

    /// Renames the journal to `journal.unreadable-<seconds since the
    /// epoch>`, next to it, for a person to look at.
    fn set_aside(&mut self) -> Result<(), JournalError> {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut name = self.path.as_os_str().to_owned();
        name.push(format!(".unreadable-{secs}"));
        match fsutil::rename_durable(&self.path, Path::new(&name)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(store_error(&self.path, "setting aside", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iot_ota_core::journal::Phase;

    #[test]
    fn saves_loads_and_sets_aside_an_unreadable_journal() {
        let dir = std::env::temp_dir().join(format!("iot-ota-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut store = FileJournal::in_dir(&dir);
        assert_eq!(store.load(), Ok(None));
        let mut j = Journal::new("1.0", "2.0", "7");
        j.phase = Phase::Installed;
        store.save(&j).unwrap();
        assert_eq!(store.load(), Ok(Some(j.clone())));
        j.phase = Phase::Booted;
        store.save(&j).unwrap();
        assert_eq!(store.load(), Ok(Some(j)));
        // A torn write of the journal (not of its temporary file) is
        // reported, then moved aside: the device goes on without it.
        let bytes = std::fs::read(store.path()).unwrap();
        std::fs::write(store.path(), &bytes[..bytes.len() / 2]).unwrap();
        assert!(matches!(store.load(), Err(JournalError::Corrupt(_))));
        store.set_aside().unwrap();
        assert_eq!(store.load(), Ok(None));
        let aside: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("journal.unreadable-")
            })
            .collect();
        assert_eq!(aside.len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
