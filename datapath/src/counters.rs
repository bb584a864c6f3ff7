//! Per-CPU allowed/denied counters, one entry per attachment (keyed by ifindex).
use aya::maps::{Map, MapData, MapError, PerCpuHashMap};
use egress_deny_common::CounterKey;
pub use egress_deny_common::Counters;

use crate::{
    error::{Error, Result, is_missing, missing_is_not_installed},
    paths::{COUNTERS_MAP, PinLayout},
};

pub struct CounterMap {
    map: PerCpuHashMap<MapData, CounterKey, Counters>,
}

impl CounterMap {
    pub fn open(layout: &PinLayout) -> Result<Self> {
        let path = layout.map(COUNTERS_MAP);
        let data = MapData::from_pin(&path).map_err(|e| match e {
            MapError::SyscallError(s) => missing_is_not_installed(&path, s.io_error),
            other => Error::map(format!("opening {}", path.display()), other),
        })?;
        let map = PerCpuHashMap::try_from(Map::PerCpuHashMap(data)).map_err(|e| {
            Error::map(
                format!("{} is not the expected per-CPU hash", path.display()),
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
