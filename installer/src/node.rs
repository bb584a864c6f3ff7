//! Facts about the node: default routes (host interfaces to filter, gateways to keep
//! reachable), and installing the plugin binary.
use std::{
    fs,
    io::{self, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::fs::PermissionsExt,
    path::Path,
};

use anyhow::{Context, Result, bail};

/// Default routes: (interface, gateway) from /proc/net/route and /proc/net/ipv6_route.
pub fn default_routes() -> Vec<(String, Option<IpAddr>)> {
    let mut out = Vec::new();
    if let Ok(text) = fs::read_to_string("/proc/net/route") {
        out.extend(ipv4_default_routes(&text));
    }
    if let Ok(text) = fs::read_to_string("/proc/net/ipv6_route") {
        out.extend(ipv6_default_routes(&text));
    }
    out
}

/// The default routes in the text of /proc/net/route (a header line, then one route a
/// line); a malformed line is skipped.
fn ipv4_default_routes(text: &str) -> Vec<(String, Option<IpAddr>)> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 8 && f[1] == "00000000" && f[7] == "00000000" {
            let gw = u32::from_str_radix(f[2], 16).ok().filter(|g| *g != 0);
            // The kernel prints the gateway in host (little-endian) byte order.
            out.push((
                f[0].to_owned(),
                gw.map(|g| IpAddr::V4(Ipv4Addr::from(g.swap_bytes()))),
            ));
        }
    }
    out
}

/// The default routes in the text of /proc/net/ipv6_route (no header), but the
/// loopback's unreachable one; a malformed line is skipped.
fn ipv6_default_routes(text: &str) -> Vec<(String, Option<IpAddr>)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 10
            && f[0] == "00000000000000000000000000000000"
            && f[1] == "00"
            && f[9] != "lo"
        {
            let gw = u128::from_str_radix(f[4], 16).ok().filter(|g| *g != 0);
            out.push((f[9].to_owned(), gw.map(|g| IpAddr::V6(Ipv6Addr::from(g)))));
        }
    }
    out
}

/// The host interfaces to filter for `--host-interfaces`.
pub fn host_interfaces(setting: &str) -> Vec<String> {
    let mut names: Vec<String> = match setting.trim() {
        "none" | "" => Vec::new(),
        "auto" => default_routes().into_iter().map(|(i, _)| i).collect(),
        list => list
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect(),
    };
    names.sort();
    names.dedup();
    names
}

/// The plugin's file name, next to this executable and in the CNI bin dir.
pub const PLUGIN_NAME: &str = "egress-deny";

/// Installs the plugin (`--plugin-binary`, or the one next to this executable) into the
/// CNI bin dir.
pub fn install_plugin(plugin_binary: Option<&Path>, cni_bin_dir: &Path) -> Result<()> {
    let plugin_source = match plugin_binary {
        Some(path) => path.to_path_buf(),
        None => std::env::current_exe()?
            .parent()
            .map(|d| d.join(PLUGIN_NAME))
            .context("own directory")?,
    };
    if !plugin_source.is_file() {
        bail!(
            "plugin binary {} not found (--plugin-binary)",
            plugin_source.display()
        );
    }
    if install_binary(&plugin_source, cni_bin_dir, PLUGIN_NAME)
        .with_context(|| format!("installing the plugin into {}", cni_bin_dir.display()))?
    {
        log::info!("installed {} into {}", PLUGIN_NAME, cni_bin_dir.display());
    }
    Ok(())
}

/// Copies the plugin into the CNI bin dir atomically; skipped when identical.
/// Returns whether it wrote.
pub fn install_binary(source: &Path, bin_dir: &Path, name: &str) -> io::Result<bool> {
    let target = bin_dir.join(name);
    let content = fs::read(source)?;
    if fs::read(&target).is_ok_and(|current| current == content) {
        return Ok(false);
    }
    fs::create_dir_all(bin_dir)?;
    let tmp = bin_dir.join(format!(".{name}.tmp{}", std::process::id()));
    let write = || -> io::Result<()> {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(&content)?;
        file.set_permissions(fs::Permissions::from_mode(0o755))?;
        file.sync_all()?;
        fs::rename(&tmp, &target)?;
        fs::File::open(bin_dir)?.sync_all()
    };
    write().inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })?;
    Ok(true)
}

#[cfg(test)]
mod tests;
