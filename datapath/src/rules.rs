//! The node-wide rule tables in the kernel: per address family an outer map whose slot 0
//! holds the compiled table in force (see `table` for the layout). A new rule set is
//! compiled into a fresh inner map, written block by block, frozen, and swapped in with
//! one map update: every attachment sees the whole old set or the whole new one. The
//! update returns once no program can still be reading the old table (the kernel waits
//! for an RCU grace period on map-in-map updates), which is then freed as one block of
//! memory.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, AsRawFd, OwnedFd},
    time::{Duration, Instant},
};

use egress_deny_common::{TABLE_BLOCK_BYTES, TABLE_MAP_FLAGS, TableHeader};
use ipnet::{IpNet, Ipv6Net};

use crate::{
    error::{Error, Result, is_missing, missing_is_not_installed},
    paths::{PinLayout, V4_TABLE_MAP, V6_TABLE_MAP},
    sys,
    table::{self, Entry, Layout, TableError, TableKey, TableView},
};

/// A rule's action; defined with the rule model the table compiler reads.
pub use crate::table::Action;

/// Result of looking an address up the way the datapath does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    /// The deciding rule; `None` when no rule matches (allowed by default).
    pub prefix: Option<IpNet>,
    /// Denied by an IPv4 rule through this NAT64 prefix, for this embedded address.
    pub via_nat64: Option<(Ipv6Net, IpAddr)>,
}

/// What one swap did, for logs, `status` and `/metrics`.
#[derive(Clone, Copy, Debug)]
pub struct Swap {
    pub summary: table::TableSummary,
    /// Compiling and writing the new table into its map.
    pub build: Duration,
    /// The outer-map update that made it the one in force.
    pub swap: Duration,
    /// Kernel ID of the new table's map.
    pub table_id: u32,
}

/// The pinned outer maps of both families.
pub struct RuleTables {
    v4: OwnedFd,
    v6: OwnedFd,
}

impl RuleTables {
    pub fn open(layout: &PinLayout) -> Result<Self> {
        let open = |name: &str| {
            let path = layout.map(name);
            sys::obj_get(&path).map_err(|e| missing_is_not_installed(&path, e))
        };
        Ok(Self {
            v4: open(V4_TABLE_MAP)?,
            v6: open(V6_TABLE_MAP)?,
        })
    }

    /// Kernel IDs of the (IPv4, IPv6) tables in force; 0 where there is none yet.
    pub fn table_ids(&self) -> Result<(u32, u32)> {
        Ok((table_id(&self.v4)?, table_id(&self.v6)?))
    }

    /// Compiles `rules` (sorted by (addr, len), deduplicated) into a new IPv4 table and
    /// makes it the one in force.
    pub fn replace_v4(&self, rules: &[Entry<u32>]) -> Result<Swap> {
        self.replace(rules, Layout::default())
    }

    pub fn replace_v6(&self, rules: &[Entry<u128>]) -> Result<Swap> {
        self.replace(rules, Layout::default())
    }

    /// As [`Self::replace_v4`] with another layout (benchmarks compare layouts).
    pub fn replace_v4_with(&self, rules: &[Entry<u32>], layout: Layout) -> Result<Swap> {
        self.replace(rules, layout)
    }

    fn replace<K: TableKey>(&self, rules: &[Entry<K>], layout: Layout) -> Result<Swap> {
        if K::FAMILY == 4 {
            replace(&self.v4, V4_TABLE_MAP, rules, layout)
        } else {
            replace(&self.v6, V6_TABLE_MAP, rules, layout)
        }
    }

    /// Decides `addr` with the tables in force (see [`Snapshot::decide`]).
    pub fn decide(&self, addr: IpAddr, nat64: &[Ipv6Net]) -> Result<Decision> {
        self.snapshot()?.decide(addr, nat64)
    }

    /// Decides `addr` by its own family's table (see [`Snapshot::lookup`]).
    pub fn lookup(&self, addr: IpAddr) -> Result<Decision> {
        self.snapshot()?.lookup(addr)
    }

    /// Replaces both tables by `rules` (any order; a later duplicate prefix wins). For
    /// tools and tests.
    pub fn replace_all(&self, rules: &[(IpNet, Action)]) -> Result<()> {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for (net, action) in rules.iter().rev() {
            match net.trunc() {
                IpNet::V4(n) => v4.push(Entry {
                    addr: u32::from(n.network()),
                    len: n.prefix_len(),
                    action: *action,
                }),
                IpNet::V6(n) => v6.push(Entry {
                    addr: u128::from(n.network()),
                    len: n.prefix_len(),
                    action: *action,
                }),
            }
        }
        // Stable sort, then keep the first of each prefix: the last given.
        v4.sort_by_key(|e| (e.addr, e.len));
        v4.dedup_by_key(|e| (e.addr, e.len));
        v6.sort_by_key(|e| (e.addr, e.len));
        v6.dedup_by_key(|e| (e.addr, e.len));
        self.replace_v4(&v4)?;
        self.replace_v6(&v6)?;
        Ok(())
    }

    /// The tables in force, mapped read-only (they never change once swapped in).
    pub fn snapshot(&self) -> Result<Snapshot> {
        Ok(Snapshot {
            v4: MappedTable::current(&self.v4)?,
            v6: MappedTable::current(&self.v6)?,
        })
    }

    /// Whether either table holds a rule (cheap: two headers).
    pub fn hold_rules(&self) -> bool {
        self.snapshot().is_ok_and(|s| {
            [s.header(4), s.header(6)]
                .iter()
                .flatten()
                .any(|h| h.deny_rules + h.allow_rules > 0)
        })
    }

    /// Every deciding rule of both tables (read back from the ranges).
    pub fn entries(&self) -> Result<Vec<(IpNet, Action)>> {
        let snapshot = self.snapshot()?;
        let net = |addr: IpAddr, len: u8| IpNet::new(addr, len).expect("a table's prefix");
        let mut out: Vec<(IpNet, Action)> = snapshot
            .v4_rules()?
            .into_iter()
            .map(|e| (net(Ipv4Addr::from(e.addr).into(), e.len), e.action))
            .collect();
        out.extend(
            snapshot
                .v6_rules()?
                .into_iter()
                .map(|e| (net(Ipv6Addr::from(e.addr).into(), e.len), e.action)),
        );
        Ok(out)
    }

    /// Adds (or changes) one rule: the tables in force read back, changed, compiled and
    /// swapped. For tools and tests; the installer replaces whole sets.
    pub fn insert(&self, net: IpNet, action: Action) -> Result<()> {
        self.edit(net, Some(action)).map(drop)
    }

    /// Removes the rule for exactly `net`. Returns false when there was none.
    pub fn remove(&self, net: IpNet) -> Result<bool> {
        self.edit(net, None)
    }

    fn edit(&self, net: IpNet, action: Option<Action>) -> Result<bool> {
        match net.trunc() {
            IpNet::V4(n) => self.edit_family(u32::from(n.network()), n.prefix_len(), action),
            IpNet::V6(n) => self.edit_family(u128::from(n.network()), n.prefix_len(), action),
        }
    }

    fn edit_family<K: TableKey>(&self, addr: K, len: u8, action: Option<Action>) -> Result<bool> {
        let snapshot = self.snapshot()?;
        let mut rules = snapshot.rules::<K>()?;
        let changed = edit(&mut rules, addr, len, action);
        drop(snapshot);
        self.replace(&rules, Layout::default())?;
        Ok(changed)
    }
}

/// Sets (or with `None` removes) the rule for (addr, len) in a sorted rule list.
fn edit<K: TableKey>(rules: &mut Vec<Entry<K>>, addr: K, len: u8, action: Option<Action>) -> bool {
    let at = rules.binary_search_by(|e| (e.addr, e.len).cmp(&(addr, len)));
    match (at, action) {
        (Ok(i), Some(action)) => {
            rules[i].action = action;
            true
        }
        (Ok(i), None) => {
            rules.remove(i);
            true
        }
        (Err(i), Some(action)) => {
            rules.insert(i, Entry { addr, len, action });
            true
        }
        (Err(_), None) => false,
    }
}

fn replace<K: TableKey>(
    outer: &OwnedFd,
    name: &str,
    rules: &[Entry<K>],
    layout: Layout,
) -> Result<Swap> {
    let started = Instant::now();
    let plan = table::Plan::new(rules, layout)?;
    let summary = plan.summary();
    let inner = sys::array_map_create(
        name,
        TABLE_BLOCK_BYTES as u32,
        summary.blocks,
        TABLE_MAP_FLAGS,
    )
    .map_err(|e| {
        Error::io(
            format!(
                "creating a {} MiB table map for {} ranges",
                summary.bytes >> 20,
                summary.ranges
            ),
            e,
        )
    })?;
    plan.write(rules, |index, block| {
        sys::map_update(inner.as_fd(), &index.to_ne_bytes(), block, 0)
    })
    .map_err(|e| match e {
        table::CompileError::Table(e) => Error::from(e),
        table::CompileError::Sink { block, source } => {
            Error::io(format!("writing block {block} of the new {name}"), source)
        }
    })?;
    sys::map_freeze(inner.as_fd()).map_err(|e| Error::io(format!("freezing the new {name}"), e))?;
    let table_id = sys::map_info(inner.as_fd())
        .map_err(|e| Error::io("reading the new table's id", e))?
        .id;
    let build = started.elapsed();
    let swapping = Instant::now();
    sys::map_update(
        outer.as_fd(),
        &0u32.to_ne_bytes(),
        &(inner.as_raw_fd() as u32).to_ne_bytes(),
        0,
    )
    .map_err(|e| Error::io(format!("swapping in the new {name}"), e))?;
    Ok(Swap {
        summary,
        build,
        swap: swapping.elapsed(),
        table_id,
    })
}

/// The ID of the table in slot 0 of `outer` (0 when empty).
fn table_id(outer: &OwnedFd) -> Result<u32> {
    let mut id = [0u8; 4];
    match sys::map_lookup(outer.as_fd(), &0u32.to_ne_bytes(), &mut id) {
        Ok(()) => Ok(u32::from_ne_bytes(id)),
        Err(e) if is_missing(&e) => Ok(0),
        Err(e) => Err(Error::io("reading the table in force", e)),
    }
}

/// One table, mapped read-only.
struct MappedTable {
    ptr: *mut libc::c_void,
    len: usize,
    id: u32,
}

// SAFETY: a read-only shared mapping of a frozen map; nothing writes it.
unsafe impl Send for MappedTable {}
unsafe impl Sync for MappedTable {}

impl MappedTable {
    /// The table in slot 0 of `outer`, or `None` when there is none. Retries when the
    /// table is swapped (and freed) between reading its ID and opening it.
    fn current(outer: &OwnedFd) -> Result<Option<Self>> {
        for _ in 0..10 {
            let id = table_id(outer)?;
            if id == 0 {
                return Ok(None);
            }
            let fd = match sys::map_fd_by_id(id) {
                Ok(fd) => fd,
                Err(e) if is_missing(&e) => continue,
                Err(e) => return Err(Error::io(format!("opening table map {id}"), e)),
            };
            let info =
                sys::map_info(fd.as_fd()).map_err(|e| Error::io("reading the table's size", e))?;
            let len = info.max_entries as usize * TABLE_BLOCK_BYTES;
            // SAFETY: a fresh read-only shared mapping of the map's whole value area.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Err(Error::io(
                    format!("mapping table map {id}"),
                    std::io::Error::last_os_error(),
                ));
            }
            return Ok(Some(Self { ptr, len, id }));
        }
        Err(Error::Invalid(
            "the rule table kept changing while it was read".into(),
        ))
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: mapped read-only for `len` bytes until drop.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len) }
    }
}

impl Drop for MappedTable {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `current` mapped.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// The tables in force at one moment, mapped read-only.
pub struct Snapshot {
    v4: Option<MappedTable>,
    v6: Option<MappedTable>,
}

impl Snapshot {
    /// The family's table checked by its header only (O(1)), for searching.
    fn view<K: TableKey>(table: &Option<MappedTable>) -> Result<Option<TableView<'_, K>>> {
        view_with(table, TableView::parse_header)
    }

    /// The header of the family's table (4 or 6), if there is one.
    pub fn header(&self, family: u8) -> Option<TableHeader> {
        match family {
            4 => Some(*Self::view::<u32>(&self.v4).ok()??.header()),
            _ => Some(*Self::view::<u128>(&self.v6).ok()??.header()),
        }
    }

    /// Bytes of kernel memory the family's table takes (0 without one).
    pub fn table_bytes(&self, family: u8) -> u64 {
        self.table(family).as_ref().map_or(0, |t| t.len as u64)
    }

    /// Kernel ID of the family's table (0 without one).
    pub fn table_id(&self, family: u8) -> u32 {
        self.table(family).as_ref().map_or(0, |t| t.id)
    }

    fn table(&self, family: u8) -> &Option<MappedTable> {
        if family == 4 { &self.v4 } else { &self.v6 }
    }

    /// The deciding rules of the IPv4 table (validated whole first).
    pub fn v4_rules(&self) -> Result<Vec<Entry<u32>>> {
        self.rules()
    }

    pub fn v6_rules(&self) -> Result<Vec<Entry<u128>>> {
        self.rules()
    }

    fn rules<K: TableKey>(&self) -> Result<Vec<Entry<K>>> {
        Ok(full_view::<K>(self.table(K::FAMILY as u8))?
            .map(|v| v.rules())
            .transpose()?
            .unwrap_or_default())
    }

    /// Decides `addr` exactly as the eBPF program does, NAT64 included: an IPv6 address
    /// in one of `nat64` (/96 prefixes) that no IPv6 rule denies is denied when the IPv4
    /// rules deny its embedded IPv4 address (`Decision::via_nat64` says so).
    pub fn decide(&self, addr: IpAddr, nat64: &[Ipv6Net]) -> Result<Decision> {
        let direct = self.lookup(addr)?;
        if direct.action == Action::Deny {
            return Ok(direct);
        }
        if let IpAddr::V6(v6) = addr
            && let Some(prefix) = nat64.iter().find(|p| p.contains(&v6))
        {
            let [.., a, b, c, d] = v6.octets();
            let embedded = IpAddr::V4(Ipv4Addr::new(a, b, c, d));
            let via = self.lookup(embedded)?;
            if via.action == Action::Deny {
                return Ok(Decision {
                    via_nat64: Some((*prefix, embedded)),
                    ..via
                });
            }
        }
        Ok(direct)
    }

    /// Decides `addr` by its own family's table only (see [`Self::decide`]).
    pub fn lookup(&self, addr: IpAddr) -> Result<Decision> {
        let verdict = match addr {
            IpAddr::V4(a) => Self::view::<u32>(&self.v4)?.map(|v| v.search(u32::from(a)).verdict),
            IpAddr::V6(a) => Self::view::<u128>(&self.v6)?.map(|v| v.search(u128::from(a)).verdict),
        };
        Ok(match verdict.and_then(table::decode_verdict) {
            None => Decision {
                action: Action::Allow,
                prefix: None,
                via_nat64: None,
            },
            Some((action, len)) => Decision {
                action,
                prefix: IpNet::new(addr, len).ok().map(|n| n.trunc()),
                via_nat64: None,
            },
        })
    }
}

/// A table validated whole (O(size)), for reading every rule back.
fn full_view<K: TableKey>(table: &Option<MappedTable>) -> Result<Option<TableView<'_, K>>> {
    view_with(table, TableView::parse)
}

fn view_with<'a, K: TableKey>(
    table: &'a Option<MappedTable>,
    parse: fn(&'a [u8]) -> std::result::Result<TableView<'a, K>, TableError>,
) -> Result<Option<TableView<'a, K>>> {
    table
        .as_ref()
        .map(|t| parse(t.bytes()))
        .transpose()
        .map_err(Error::from)
}

/// Kernel IDs of the pinned outer maps (IPv4, IPv6): a replaced outer map gets a new
/// ID, which tells the loader whether the program in use reads these very maps.
pub fn rule_map_ids(layout: &PinLayout) -> Result<(u32, u32)> {
    let id = |name: &str| -> Result<u32> {
        let path = layout.map(name);
        let fd = sys::obj_get(&path).map_err(|e| missing_is_not_installed(&path, e))?;
        sys::map_info(fd.as_fd())
            .map(|info| info.id)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))
    };
    Ok((id(V4_TABLE_MAP)?, id(V6_TABLE_MAP)?))
}
