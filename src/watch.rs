//! Re-reading mounted files when they change: the partner key and the
//! cluster's JWKS. Watches the file's directory, which also catches the atomic
//! `..data` symlink swap Kubernetes uses for Secrets and ConfigMaps. Only
//! changes to the file itself (or to Kubernetes' `..`-named entries) count:
//! reading it, or writing a neighbour such as a log file, does not, so a
//! reload never triggers the next one.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
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

/// Calls `changed` (once per burst of events) whenever the file at `path`
/// may have changed.
pub fn on_change(path: &Path, changed: impl Fn() + Send + 'static) -> std::io::Result<FileWatch> {
    on_change_of(&[path], changed)
}

/// Calls `changed` once per burst of events that may have changed any of
/// `paths` (a certificate and its key renamed into place one after the
/// other make one burst, so one call).
pub fn on_change_of(
    paths: &[&Path],
    changed: impl Fn() + Send + 'static,
) -> std::io::Result<FileWatch> {
    let (events, mut received) = mpsc::unbounded_channel::<()>();
    let names: Vec<OsString> = paths
        .iter()
        .map(|path| path.file_name().map(OsString::from).unwrap_or_default())
        .collect();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|event| names.iter().any(|name| concerns(&event, name))) {
            let _ = events.send(());
        }
    })
    .map_err(std::io::Error::other)?;
    let mut directories: Vec<&Path> = paths.iter().map(|path| directory_of(path)).collect();
    directories.sort();
    directories.dedup();
    for directory in directories {
        watcher
            .watch(directory, RecursiveMode::NonRecursive)
            .map_err(std::io::Error::other)?;
    }
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

/// Whether `event` may change what the file called `name` reads as: a
/// write, create, rename, removal or attribute change of the file itself, or
/// of a `..`-named entry (kubelet's `..data` swap). Opening and reading, ours
/// included, are not.
fn concerns(event: &notify::Event, name: &OsString) -> bool {
    !matches!(event.kind, EventKind::Access(_))
        && event.paths.iter().any(|path| {
            path.file_name()
                .is_some_and(|entry| entry == name || entry.as_encoded_bytes().starts_with(b".."))
        })
}

/// The directory to watch: the file's parent, or `.` for a bare file name.
fn directory_of(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    async fn settled() {
        tokio::time::sleep(SETTLE * 4).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_changes_to_the_file_itself_count() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("partner-key");
        std::fs::write(&file, "one").unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let watch = on_change(&file, {
            let calls = calls.clone();
            let file = file.clone();
            move || {
                // What every reload does; it must not count as a change.
                std::fs::read(&file).unwrap();
                calls.fetch_add(1, Ordering::SeqCst);
            }
        })
        .unwrap();

        std::fs::read(&file).unwrap();
        std::fs::write(dir.path().join("broker.log"), "a neighbour").unwrap();
        settled().await;
        assert_eq!(calls.load(Ordering::SeqCst), 0, "reads and neighbours");

        std::fs::write(&file, "two").unwrap();
        settled().await;
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one write, one call");
        settled().await;
        assert_eq!(calls.load(Ordering::SeqCst), 1, "the reload's own read");

        std::fs::write(dir.path().join("..data_tmp"), "").unwrap();
        settled().await;
        assert_eq!(calls.load(Ordering::SeqCst), 2, "kubelet's entries");
        drop(watch);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_files_changed_together_make_one_call() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        std::fs::write(&cert, "one").unwrap();
        std::fs::write(&key, "one").unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let watch = on_change_of(&[&cert, &key], {
            let calls = calls.clone();
            move || {
                calls.fetch_add(1, Ordering::SeqCst);
            }
        })
        .unwrap();

        std::fs::write(&key, "two").unwrap();
        std::fs::write(&cert, "two").unwrap();
        settled().await;
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one burst, one call");
        std::fs::write(dir.path().join("tls.crt.bak"), "a neighbour").unwrap();
        settled().await;
        assert_eq!(calls.load(Ordering::SeqCst), 1, "neighbours do not count");
        drop(watch);
    }
}
