//! The pinned rule tries: one LPM trie per family holding deny rules and `!` allow
//! exceptions. The longest matching prefix decides.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::ControlFlow,
};

use aya::maps::{
    Map, MapData, MapError,
    lpm_trie::{Key, LpmTrie},
};
use egress_deny_common::{ACTION_DENY, RuleValue};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::{
    error::{Error, Result, missing_is_not_installed},
    paths::{PinLayout, V4_RULES_MAP, V6_RULES_MAP},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Deny,
    Allow,
}

impl Action {
    fn value(self, prefix_len: u8) -> RuleValue {
        match self {
            Action::Deny => RuleValue::deny(prefix_len),
            Action::Allow => RuleValue::allow(prefix_len),
        }
    }

    fn of(value: &RuleValue) -> Self {
        if value.action == ACTION_DENY {
            Action::Deny
        } else {
            Action::Allow
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Deny => "deny",
            Action::Allow => "allow",
        }
    }
}

/// Result of looking an address up the way the datapath does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    /// The deciding entry; `None` when no entry matches (allowed by default).
    pub prefix: Option<IpNet>,
    /// Denied by an IPv4 rule through this NAT64 prefix, for this embedded address.
    pub via_nat64: Option<(Ipv6Net, IpAddr)>,
}

pub struct RuleMaps {
    v4: LpmTrie<MapData, [u8; 4], RuleValue>,
    v6: LpmTrie<MapData, [u8; 16], RuleValue>,
}

fn open_trie<K: aya::Pod>(
    layout: &PinLayout,
    name: &str,
) -> Result<LpmTrie<MapData, K, RuleValue>> {
    let path = layout.map(name);
    let data = MapData::from_pin(&path).map_err(|e| match e {
        MapError::SyscallError(s) => missing_is_not_installed(&path, s.io_error),
        other => Error::map(format!("opening {}", path.display()), other),
    })?;
    LpmTrie::try_from(Map::LpmTrie(data)).map_err(|e| {
        Error::map(
            format!("{} is not the expected LPM trie", path.display()),
            e,
        )
    })
}

impl RuleMaps {
    pub fn open(layout: &PinLayout) -> Result<Self> {
        Ok(Self {
            v4: open_trie(layout, V4_RULES_MAP)?,
            v6: open_trie(layout, V6_RULES_MAP)?,
        })
    }

    /// Inserts or overwrites the entry for exactly `net`.
    pub fn insert(&mut self, net: IpNet, action: Action) -> Result<()> {
        let net = net.trunc();
        let value = action.value(net.prefix_len());
        match net {
            IpNet::V4(n) => self.v4.insert(&v4_key(&n), value, 0),
            IpNet::V6(n) => self.v6.insert(&v6_key(&n), value, 0),
        }
        .map_err(|e| Error::map(format!("inserting {net}"), e))
    }

    /// Removes the entry for exactly `net`. Returns false when there was none.
    pub fn remove(&mut self, net: IpNet) -> Result<bool> {
        let net = net.trunc();
        let res = match net {
            IpNet::V4(n) => self.v4.remove(&v4_key(&n)),
            IpNet::V6(n) => self.v6.remove(&v6_key(&n)),
        };
        match res {
            Ok(()) => Ok(true),
            Err(MapError::SyscallError(s)) if s.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(false)
            }
            Err(e) => Err(Error::map(format!("removing {net}"), e)),
        }
    }

    /// The action stored for exactly `net`, if there is such an entry.
    pub fn get_exact(&self, net: IpNet) -> Result<Option<Action>> {
        let net = net.trunc();
        let found = match net {
            IpNet::V4(n) => not_found_is_none(self.v4.get(&v4_key(&n), 0))?,
            IpNet::V6(n) => not_found_is_none(self.v6.get(&v6_key(&n), 0))?,
        };
        Ok(found
            .filter(|v| v.prefix_len == net.prefix_len())
            .map(|v| Action::of(&v)))
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
            let embedded = IpAddr::V4(std::net::Ipv4Addr::new(a, b, c, d));
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

    /// Decides `addr` by its own family's rules only (see [`Self::decide`]).
    pub fn lookup(&self, addr: IpAddr) -> Result<Decision> {
        let found = match addr {
            IpAddr::V4(a) => not_found_is_none(self.v4.get(&Key::new(32, a.octets()), 0))?,
            IpAddr::V6(a) => not_found_is_none(self.v6.get(&Key::new(128, a.octets()), 0))?,
        };
        Ok(match found {
            None => Decision {
                action: Action::Allow,
                prefix: None,
                via_nat64: None,
            },
            Some(v) => Decision {
                action: Action::of(&v),
                prefix: IpNet::new(addr, v.prefix_len).ok().map(|n| n.trunc()),
                via_nat64: None,
            },
        })
    }

    /// Inserts an IPv4 entry given as network-order octets (already truncated): the
    /// installer's bulk path, without building an `IpNet` per rule.
    pub fn insert_v4(&mut self, octets: [u8; 4], prefix_len: u8, action: Action) -> Result<()> {
        self.v4
            .insert(
                &Key::new(u32::from(prefix_len), octets),
                action.value(prefix_len),
                0,
            )
            .map_err(|e| {
                Error::map(
                    format!("inserting {}/{prefix_len}", Ipv4Addr::from(octets)),
                    e,
                )
            })
    }

    pub fn insert_v6(&mut self, octets: [u8; 16], prefix_len: u8, action: Action) -> Result<()> {
        self.v6
            .insert(
                &Key::new(u32::from(prefix_len), octets),
                action.value(prefix_len),
                0,
            )
            .map_err(|e| {
                Error::map(
                    format!("inserting {}/{prefix_len}", Ipv6Addr::from(octets)),
                    e,
                )
            })
    }

    /// Removes an exact IPv4 entry; absent is fine.
    pub fn remove_v4(&mut self, octets: [u8; 4], prefix_len: u8) -> Result<()> {
        absent_is_ok(self.v4.remove(&Key::new(u32::from(prefix_len), octets)))
    }

    pub fn remove_v6(&mut self, octets: [u8; 16], prefix_len: u8) -> Result<()> {
        absent_is_ok(self.v6.remove(&Key::new(u32::from(prefix_len), octets)))
    }

    /// Walks the IPv4 trie without materialising `IpNet`s (millions of entries) until
    /// `f` breaks.
    pub fn for_each_v4(
        &self,
        mut f: impl FnMut([u8; 4], u8, Action) -> ControlFlow<()>,
    ) -> Result<()> {
        for item in self.v4.iter() {
            let (key, value) = item.map_err(|e| Error::map("walking v4_rules", e))?;
            if f(key.data(), key.prefix_len() as u8, Action::of(&value)).is_break() {
                break;
            }
        }
        Ok(())
    }

    pub fn for_each_v6(
        &self,
        mut f: impl FnMut([u8; 16], u8, Action) -> ControlFlow<()>,
    ) -> Result<()> {
        for item in self.v6.iter() {
            let (key, value) = item.map_err(|e| Error::map("walking v6_rules", e))?;
            if f(key.data(), key.prefix_len() as u8, Action::of(&value)).is_break() {
                break;
            }
        }
        Ok(())
    }

    /// Every entry of both tries (a full walk: O(n) syscalls).
    pub fn entries(&self) -> Result<Vec<(IpNet, Action)>> {
        let mut out = Vec::new();
        for item in self.v4.iter() {
            let (key, value) = item.map_err(|e| Error::map("walking v4_rules", e))?;
            let net = Ipv4Net::new(Ipv4Addr::from(key.data()), key.prefix_len() as u8)
                .map_err(|e| Error::Invalid(e.to_string()))?;
            out.push((IpNet::V4(net), Action::of(&value)));
        }
        for item in self.v6.iter() {
            let (key, value) = item.map_err(|e| Error::map("walking v6_rules", e))?;
            let net = Ipv6Net::new(Ipv6Addr::from(key.data()), key.prefix_len() as u8)
                .map_err(|e| Error::Invalid(e.to_string()))?;
            out.push((IpNet::V6(net), Action::of(&value)));
        }
        Ok(out)
    }
}

fn v4_key(net: &Ipv4Net) -> Key<[u8; 4]> {
    Key::new(u32::from(net.prefix_len()), net.network().octets())
}

fn v6_key(net: &Ipv6Net) -> Key<[u8; 16]> {
    Key::new(u32::from(net.prefix_len()), net.network().octets())
}

fn absent_is_ok(res: std::result::Result<(), MapError>) -> Result<()> {
    match res {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(s)) if s.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(Error::map("removing a rule", e)),
    }
}

fn not_found_is_none(res: std::result::Result<RuleValue, MapError>) -> Result<Option<RuleValue>> {
    match res {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(MapError::SyscallError(s)) if s.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(None)
        }
        Err(e) => Err(Error::map("looking up a rule", e)),
    }
}

/// Kernel IDs of the pinned (IPv4, IPv6) rule maps: a replaced map gets a new ID, so
/// the installer can tell whether what it recorded about the maps still applies.
pub fn rule_map_ids(layout: &PinLayout) -> Result<(u32, u32)> {
    let id = |name: &str| -> Result<u32> {
        let path = layout.map(name);
        aya::maps::MapInfo::from_pin(&path)
            .map(|info| info.id())
            .map_err(|e| match e {
                MapError::SyscallError(s) => missing_is_not_installed(&path, s.io_error),
                other => Error::map(format!("reading {}", path.display()), other),
            })
    };
    Ok((id(V4_RULES_MAP)?, id(V6_RULES_MAP)?))
}
