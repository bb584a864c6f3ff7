//! Builds the eBPF object (bpfel-unknown-none, nightly + bpf-linker) and leaves it in
//! OUT_DIR for `include_bytes_aligned!`. Run `tests/setup.sh` once to install the tools.
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../bpf/ebpf");
    let package = Package {
        name: "egress-deny-ebpf",
        root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::Nightly)
}
