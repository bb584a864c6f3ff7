//! Opening a map the installer pinned, with one meaning for "not there": the datapath
//! is not installed (see [`Error::NotInstalled`]).
use aya::maps::{MapData, MapError};

use crate::{
    error::{Error, Result, missing_is_not_installed},
    paths::PinLayout,
};

pub(crate) fn open_pinned_map(layout: &PinLayout, name: &str) -> Result<MapData> {
    let path = layout.map(name);
    MapData::from_pin(&path).map_err(|e| match e {
        MapError::SyscallError(s) => missing_is_not_installed(&path, s.io_error),
        other => Error::map(format!("opening {}", path.display()), other),
    })
}
