//! File modes (`file-modes`): a sidecar started the default way under
//! umask 022 must still keep its mirror private.
//!
//! Called by `abuse::exercise`, which starts this attack's sidecar through
//! `sh -c 'umask 022; exec …'` with its mirror in a directory that does not
//! exist yet ([`MIRROR_IN_NEW_DIR`]), so the sidecar creates it. Checks: the
//! mirror file and its `-wal` and `-shm` are mode 0600, their directory
//! 0700. No request is sent; the bystander reads meanwhile.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Attack, Attacked, Field};
use crate::scenario::HarnessError;

/// Attack 11.
pub(crate) const FILE_MODES: Attack = Attack {
    name: "file-modes",
    about: "the sidecar started under umask 022 with its mirror in a directory it creates (data/catalog-cache.db)",
    checks: "the mirror file, its -wal and -shm are mode 0600 and their directory 0700",
};

/// The mirror path, relative to the lab's data dir.
pub(crate) const MIRROR_IN_NEW_DIR: &str = "data/catalog-cache.db";
/// The umask the sidecar starts with.
pub(crate) const UMASK: u32 = 0o022;

fn mode(path: &Path) -> Result<u32, String> {
    std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o777)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Attack 11: `file-modes`.
pub(crate) async fn file_modes(x: &mut Field<'_>) -> Result<Attacked, HarnessError> {
    let db = x.lab.sidecar.db();
    let side = |suffix: &str| PathBuf::from(format!("{}{suffix}", db.display()));
    let dir = db.parent().map(Path::to_path_buf).unwrap_or_default();
    // Let the bystander read for a while, as for every attack.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut attacked = Attacked::default();
    let mut seen = Vec::new();
    for (path, want) in [
        (db.clone(), 0o600),
        (side("-wal"), 0o600),
        (side("-shm"), 0o600),
        (dir, 0o700),
    ] {
        match mode(&path) {
            Ok(m) => {
                seen.push(format!("{} {m:04o}", path.display()));
                if m != want {
                    attacked.fail(format!(
                        "{} is mode {m:04o}, not {want:04o} (started under umask {UMASK:03o})",
                        path.display()
                    ));
                }
            }
            Err(e) => attacked.fail(format!("cannot read the mode of {e}")),
        }
    }
    attacked.notes.push(format!("modes: {}", seen.join(", ")));
    Ok(attacked)
}
