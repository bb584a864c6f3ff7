//! Network-namespace switching, only through a guard that switches back on drop.
//!
//! `setns(CLONE_NEWNET)` affects the calling thread only, so the guard is `!Send`: it
//! must be dropped on the thread that created it.
use std::{fs::File, marker::PhantomData, os::fd::AsFd, path::Path};

use nix::sched::{CloneFlags, setns};

use crate::error::{Error, Result};

pub struct NetnsGuard {
    original: File,
    _not_send: PhantomData<*const ()>,
}

impl NetnsGuard {
    /// Enters the network namespace at `path` (e.g. `/var/run/netns/x` or
    /// `/proc/<pid>/ns/net`) until the guard is dropped.
    pub fn enter(path: &Path) -> Result<Self> {
        let original = File::open("/proc/thread-self/ns/net")
            .map_err(|e| Error::io("opening the current network namespace", e))?;
        let target = File::open(path)
            .map_err(|e| Error::io(format!("opening network namespace {}", path.display()), e))?;
        setns(target.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
            Error::io(
                format!("entering network namespace {}", path.display()),
                e.into(),
            )
        })?;
        Ok(Self {
            original,
            _not_send: PhantomData,
        })
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if let Err(e) = setns(self.original.as_fd(), CloneFlags::CLONE_NEWNET) {
            // Continuing in the wrong namespace would act on the wrong interfaces.
            log::error!("cannot return to the original network namespace: {e}");
            std::process::abort();
        }
    }
}
