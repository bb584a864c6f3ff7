//! Per-CPU allowed/denied counters, one entry per attachment (keyed by ifindex).
use aya::maps::{Map, MapData, MapError, PerCpuHashMap};
use egress_deny_common::CounterKey;
pub use egress_deny_common::Counters;

use crate::{
    error::{Error, Result, is_missing},
    paths::{COUNTERS_MAP, PinLayout},
    pinned::open_pinned_map,
};

pub struct CounterMap {
    map: PerCpuHashMap<MapData, CounterKey, Counters>,
}

impl CounterMap {
    pub fn open(layout: &PinLayout) -> Result<Self> {
        let data = open_pinned_map(layout, COUNTERS_MAP)?;
        let map = PerCpuHashMap::try_from(Map::PerCpuHashMap(data)).map_err(|e| {
            Error::map(
                format!(
                    "{} is not the expected per-CPU hash",
                    layout.map(COUNTERS_MAP).display()
                ),
                e,
            )
        })?;
        Ok(Self { map })
    }

    /// Sum over CPUs for one attachment; zero when it has seen no packet yet.
    pub fn get(&self, ifindex: u32) -> Result<Counters> {
        match self.map.get(&CounterKey { ifindex }, 0) {
            Ok(per_cpu) => Ok(sum(per_cpu.iter())),
            Err(MapError::KeyNotFound) => Ok(Counters::default()),
            Err(MapError::SyscallError(s)) if is_missing(&s.io_error) => Ok(Counters::default()),
            Err(e) => Err(Error::map(
                format!("reading counters of ifindex {ifindex}"),
                e,
            )),
        }
    }

    /// Every attachment's summed counters.
    pub fn all(&self) -> Result<Vec<(u32, Counters)>> {
        let mut out = Vec::new();
        for item in self.map.iter() {
            let (key, per_cpu) = item.map_err(|e| Error::map("walking counters", e))?;
            out.push((key.ifindex, sum(per_cpu.iter())));
        }
        Ok(out)
    }

    /// Drops an attachment's counters (its interface is gone). Missing is fine.
    pub fn remove(&mut self, ifindex: u32) -> Result<()> {
        match self.map.remove(&CounterKey { ifindex }) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(MapError::SyscallError(s)) if is_missing(&s.io_error) => Ok(()),
            Err(e) => Err(Error::map(
                format!("removing counters of ifindex {ifindex}"),
                e,
            )),
        }
    }
}

fn sum<'a>(values: impl Iterator<Item = &'a Counters>) -> Counters {
    values.fold(Counters::default(), |mut acc, c| {
        acc.add(c);
        acc
    })
}
