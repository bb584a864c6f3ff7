//! Empty library target: lets the userspace build depend on this crate so that cargo
//! rebuilds the eBPF object when it changes (the object itself is the `egress-deny` bin).
#![no_std]
