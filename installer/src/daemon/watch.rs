//! What wakes the loops: inotify on the rules directory (and its parent, to see it
//! appear) and the CNI conf dir, and netlink link/tc notifications for the attachments.
use std::{path::Path, sync::mpsc::Sender, thread};

use anyhow::{Context, Result};
use egress_deny_datapath::netlink;
use inotify::{Inotify, WatchMask};

use super::Event;

/// Link and tc notifications of the node's namespace → an attachment check (a deleted
/// clsact qdisc or filter is restored within milliseconds rather than at the next
/// tick; a TCX program attached ahead of ours sends no notification and waits for the
/// tick).
pub(super) fn watch_datapath(tx: Sender<Event>) {
    let watch = match netlink::ChangeWatch::open() {
        Ok(watch) => watch,
        Err(e) => {
            log::warn!("no link/tc notifications ({e}); attachments are checked every tick");
            return;
        }
    };
    let spawned = thread::Builder::new()
        .name("netlink".into())
        .spawn(move || {
            while watch.wait().is_ok() {
                if tx.send(Event::Datapath).is_err() {
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("no link/tc notifications ({e})");
    }
}

/// Rules directory events → `rules_tx`, conf dir events → `conf_tx`.
pub(super) fn watch(
    rules_dir: &Path,
    conf_dir: &Path,
    rules_tx: Sender<Event>,
    conf_tx: Sender<Event>,
) -> Result<()> {
    let mut inotify = Inotify::init().context("inotify")?;
    let mask = WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MODIFY
        | WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_TO
        | WatchMask::MOVED_FROM
        | WatchMask::ATTRIB
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF;
    std::fs::create_dir_all(conf_dir)
        .with_context(|| format!("creating {}", conf_dir.display()))?;
    let conf_wd = inotify
        .watches()
        .add(conf_dir, mask)
        .context("watching the CNI conf dir")?;
    // The rules directory may not exist yet: watch its parent too, to see it appear
    // (only events naming the rules directory count there).
    let rules_parent = rules_dir.parent().unwrap_or(Path::new("/")).to_path_buf();
    let rules_name = rules_dir.file_name().map(|n| n.to_os_string());
    let parent_wd = inotify.watches().add(&rules_parent, mask).ok();
    let mut rules_wd = inotify.watches().add(rules_dir, mask).ok();
    let rules_dir = rules_dir.to_path_buf();
    thread::Builder::new()
        .name("inotify".into())
        .spawn(move || {
            let mut buffer = [0u8; 16 * 1024];
            loop {
                let events = match inotify.read_events_blocking(&mut buffer) {
                    Ok(events) => events,
                    Err(e) => {
                        log::error!("inotify: {e}");
                        return;
                    }
                };
                let (mut rules, mut conf) = (false, false);
                for event in events {
                    if event.wd == conf_wd {
                        conf = true;
                    } else if Some(&event.wd) == rules_wd.as_ref()
                        || (Some(&event.wd) == parent_wd.as_ref()
                            && event.name.map(|n| n.to_os_string()) == rules_name)
                    {
                        rules = true;
                    }
                }
                if rules {
                    // (Re)watch the directory itself once it exists (again).
                    if let Ok(wd) = inotify.watches().add(&rules_dir, mask) {
                        rules_wd = Some(wd);
                    }
                }
                if (rules && rules_tx.send(Event::Changed).is_err())
                    || (conf && conf_tx.send(Event::Changed).is_err())
                {
                    return;
                }
            }
        })?;
    Ok(())
}
