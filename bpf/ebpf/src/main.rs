//! The egress-deny tc classifier.
//!
//! Decides every packet by its destination address: one lookup in the node-wide compiled
//! rule table of its family, which says the longest matching prefix's action (a deny
//! rule or an `!` allow-exception) and length. Attached to pod veths (tc ingress) and host uplinks (tc egress).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod object;
#[cfg(target_arch = "bpf")]
mod program;
#[cfg(target_arch = "bpf")]
mod table;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // Only meaningful for bpfel-unknown-none; the host build is an empty stub so that
    // workspace-wide `cargo clippy`/`cargo test` do not trip over it.
}
