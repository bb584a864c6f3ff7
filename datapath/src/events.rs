//! Deny events: the program reports denied packets through a ring buffer, rate-limited
//! per attachment and CPU; the installer reads them and logs who was denied what.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::{Array, Map, MapData, RingBuf};
use egress_deny_common::{
    CONFIG_RULES_LOADED, DatapathConfig, DenyEvent, FAMILY_NAT64, FAMILY_V4, FAMILY_V6,
};
use ipnet::IpNet;

use crate::{
    error::{Error, Result},
    paths::{CONFIG_MAP, EVENTS_MAP, PinLayout},
    pinned::open_pinned_map,
};

fn read_config(layout: &PinLayout) -> Result<(Array<MapData, DatapathConfig>, DatapathConfig)> {
    let config: Array<MapData, DatapathConfig> =
        Array::try_from(Map::Array(open_pinned_map(layout, CONFIG_MAP)?))
            .map_err(|e| Error::map("config map", e))?;
    let value = config
        .get(&0, 0)
        .map_err(|e| Error::map("reading datapath config", e))?;
    Ok((config, value))
}

fn update_config(layout: &PinLayout, change: impl FnOnce(&mut DatapathConfig)) -> Result<()> {
    let (mut config, mut value) = read_config(layout)?;
    change(&mut value);
    config
        .set(0, value, 0)
        .map_err(|e| Error::map("writing datapath config", e))
}

/// Sets the deny-event budget (events per second per attachment and CPU; 0 = off).
pub fn set_events_per_second(layout: &PinLayout, per_second: u32) -> Result<()> {
    update_config(layout, |c| c.events_per_second = per_second)
}

pub fn events_per_second(layout: &PinLayout) -> Result<u32> {
    Ok(read_config(layout)?.1.events_per_second)
}

/// Records that a valid rule set is enforced in these maps (persists with them).
pub fn mark_rules_loaded(layout: &PinLayout) -> Result<()> {
    update_config(layout, |c| c.flags |= CONFIG_RULES_LOADED)
}

/// Whether the installer has enforced a valid rule set in the pinned maps.
pub fn rules_loaded(layout: &PinLayout) -> Result<bool> {
    Ok(read_config(layout)?.1.flags & CONFIG_RULES_LOADED != 0)
}

/// A decoded deny event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Denied {
    pub timestamp_ns: u64,
    pub ifindex: u32,
    pub packet_len: u32,
    /// Destination; `None` when the packet's IP header was too short to read it.
    pub destination: Option<IpAddr>,
    /// The deny rule that matched (`None` for unreadable headers).
    pub rule: Option<IpNet>,
}

impl Denied {
    pub fn decode(event: &DenyEvent) -> Self {
        let destination = match event.family {
            FAMILY_V4 => {
                let mut octets = [0u8; 4];
                octets.copy_from_slice(&event.daddr[..4]);
                Some(IpAddr::V4(Ipv4Addr::from(octets)))
            }
            FAMILY_V6 | FAMILY_NAT64 => Some(IpAddr::V6(Ipv6Addr::from(event.daddr))),
            _ => None,
        };
        // NAT64: the IPv4 rule that decides the embedded address.
        let ruled = match event.family {
            FAMILY_NAT64 => {
                let [.., a, b, c, d] = event.daddr;
                Some(IpAddr::V4(Ipv4Addr::new(a, b, c, d)))
            }
            _ => destination,
        };
        let rule = ruled
            .and_then(|d| IpNet::new(d, event.prefix_len).ok())
            .map(|n| n.trunc());
        Self {
            timestamp_ns: event.timestamp_ns,
            ifindex: event.ifindex,
            packet_len: event.packet_len,
            destination,
            rule,
        }
    }
}

/// Consumer of the pinned ring buffer (one consumer per node: the installer).
pub struct EventReader {
    ring: RingBuf<MapData>,
}

impl EventReader {
    pub fn open(layout: &PinLayout) -> Result<Self> {
        let ring = RingBuf::try_from(Map::RingBuf(open_pinned_map(layout, EVENTS_MAP)?))
            .map_err(|e| Error::map("events ring buffer", e))?;
        Ok(Self { ring })
    }

    /// Next pending event, if any (non-blocking). Poll the fd (`AsRawFd`) to wait.
    pub fn next_event(&mut self) -> Option<Denied> {
        let item = self.ring.next()?;
        if item.len() < std::mem::size_of::<DenyEvent>() {
            return None;
        }
        // SAFETY: the program writes whole DenyEvents; read_unaligned copes with alignment.
        let event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<DenyEvent>()) };
        Some(Denied::decode(&event))
    }
}

impl std::os::fd::AsRawFd for EventReader {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.ring.as_raw_fd()
    }
}
