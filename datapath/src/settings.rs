//! The datapath's settings map: how attachments cooperate (the judged-packet mark) and
//! which NAT64 prefixes the IPv4 rules reach into. Written by the installer at start,
//! read by the plugin (does an excluded pod need the exempt program?) and by `lookup`.
use std::net::Ipv6Addr;

use aya::maps::{Array, Map, MapData};
use egress_deny_common::{MAX_NAT64_PREFIXES, Settings};
use ipnet::Ipv6Net;

use crate::{
    error::{Error, Result},
    paths::{PinLayout, SETTINGS_MAP},
    pinned::open_pinned_map,
};

/// Settings in userspace terms.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatapathSettings {
    pub judged_mark: u32,
    pub nat64_prefixes: Vec<Ipv6Net>,
    /// Filtered pods' veths mark what they allowed too (see `Settings::pod_mark`).
    pub trust_pod_verdicts: bool,
}

impl DatapathSettings {
    /// Refuses what the program cannot apply: more than [`MAX_NAT64_PREFIXES`]
    /// prefixes, or prefixes other than /96 (RFC 6052's shorter ones split the IPv4
    /// address around a reserved octet; not supported).
    pub fn validate(&self) -> Result<()> {
        if self.nat64_prefixes.len() > MAX_NAT64_PREFIXES {
            return Err(Error::Invalid(format!(
                "at most {MAX_NAT64_PREFIXES} NAT64 prefixes"
            )));
        }
        if let Some(p) = self.nat64_prefixes.iter().find(|p| p.prefix_len() != 96) {
            return Err(Error::Invalid(format!(
                "NAT64 prefix {p}: only /96 prefixes are supported"
            )));
        }
        Ok(())
    }

    fn to_raw(&self) -> Settings {
        let mut raw = Settings {
            judged_mark: self.judged_mark,
            nat64_prefix_count: self.nat64_prefixes.len() as u32,
            pod_mark: if self.trust_pod_verdicts {
                self.judged_mark
            } else {
                0
            },
            ..Settings::default()
        };
        for (slot, prefix) in raw.nat64_prefixes.iter_mut().zip(&self.nat64_prefixes) {
            slot.copy_from_slice(&prefix.network().octets()[..12]);
        }
        raw
    }

    fn from_raw(raw: &Settings) -> Self {
        let count = (raw.nat64_prefix_count as usize).min(MAX_NAT64_PREFIXES);
        let nat64_prefixes = raw.nat64_prefixes[..count]
            .iter()
            .map(|p| {
                let mut octets = [0u8; 16];
                octets[..12].copy_from_slice(p);
                Ipv6Net::new(Ipv6Addr::from(octets), 96).expect("96 is a valid length")
            })
            .collect();
        Self {
            judged_mark: raw.judged_mark,
            nat64_prefixes,
            trust_pod_verdicts: raw.pod_mark != 0,
        }
    }
}

fn open(layout: &PinLayout) -> Result<Array<MapData, Settings>> {
    let data = open_pinned_map(layout, SETTINGS_MAP)?;
    Array::try_from(Map::Array(data)).map_err(|e| Error::map("settings map", e))
}

pub fn write(layout: &PinLayout, settings: &DatapathSettings) -> Result<()> {
    settings.validate()?;
    open(layout)?
        .set(0, settings.to_raw(), 0)
        .map_err(|e| Error::map("writing the datapath settings", e))
}

pub fn read(layout: &PinLayout) -> Result<DatapathSettings> {
    let raw = open(layout)?
        .get(&0, 0)
        .map_err(|e| Error::map("reading the datapath settings", e))?;
    Ok(DatapathSettings::from_raw(&raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_validation() {
        let s = DatapathSettings {
            judged_mark: 0x4000_0000,
            nat64_prefixes: vec![
                "64:ff9b::/96".parse().unwrap(),
                "2001:db8:64::/96".parse().unwrap(),
            ],
            trust_pod_verdicts: true,
        };
        assert_eq!(DatapathSettings::from_raw(&s.to_raw()), s);
        let short = DatapathSettings {
            nat64_prefixes: vec!["2001:db8::/32".parse().unwrap()],
            ..s.clone()
        };
        assert!(short.validate().unwrap_err().to_string().contains("/96"));
    }
}
