//! Re-reading mounted files when they change: the partner key and the
//! cluster's JWKS. Watches the file's directory, which also catches the atomic
//! `..data` symlink swap Kubernetes uses for Secrets and ConfigMaps.

use std::path::Path;
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Lets a burst of file-system events (a Secret update makes several) settle.
const SETTLE: Duration = Duration::from_millis(50);

/// A running watch; dropping it stops it.
pub struct FileWatch {
    _watcher: RecommendedWatcher,
    task: JoinHandle<()>,
}

impl Drop for FileWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Calls `changed` (once per burst of events) whenever the directory of
/// `path` changes.
pub fn on_change(path: &Path, changed: impl Fn() + Send + 'static) -> std::io::Result<FileWatch> {
    let (events, mut received) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = events.send(());
        }
    })
    .map_err(std::io::Error::other)?;
    watcher
        .watch(directory_of(path), RecursiveMode::NonRecursive)
        .map_err(std::io::Error::other)?;
    let task = tokio::spawn(async move {
        while received.recv().await.is_some() {
            tokio::time::sleep(SETTLE).await;
            while received.try_recv().is_ok() {}
            changed();
        }
    });
    Ok(FileWatch {
        _watcher: watcher,
        task,
    })
}

/// The directory to watch: the file's parent, or `.` for a bare file name.
fn directory_of(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}
