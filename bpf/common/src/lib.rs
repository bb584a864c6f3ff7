//! Types shared by the egress-deny eBPF program and userspace.
//!
//! Every type is `#[repr(C)]` with explicit padding so that the kernel, the eBPF program
//! and userspace agree on the byte layout without relying on compiler padding.
#![no_std]

/// Maximum rules per address family. LPM tries allocate per element (no prealloc), so
/// this is a ceiling, not a reservation; it must stay above 10,000,000.
pub const MAX_RULES_PER_FAMILY: u32 = 1 << 24;

/// Maximum number of attachments (pod veths + host interfaces) with live counters.
pub const MAX_ATTACHMENTS: u32 = 1 << 16;

/// Verdict stored for a prefix in the rule tries.
pub const ACTION_ALLOW: u8 = 0;
pub const ACTION_DENY: u8 = 1;

/// Value of an LPM-trie entry: the action for destinations whose longest matching prefix
/// is this entry. Allow entries are the `!CIDR` exceptions of the rule format. The entry's
/// own prefix length is repeated here because a kernel LPM lookup returns only the value,
/// and `lookup`/deny events want to name the deciding prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleValue {
    pub action: u8,
    pub prefix_len: u8,
    pub _pad: [u8; 2],
}

impl RuleValue {
    pub const fn deny(prefix_len: u8) -> Self {
        Self {
            action: ACTION_DENY,
            prefix_len,
            _pad: [0; 2],
        }
    }

    pub const fn allow(prefix_len: u8) -> Self {
        Self {
            action: ACTION_ALLOW,
            prefix_len,
            _pad: [0; 2],
        }
    }

    pub const fn is_deny(&self) -> bool {
        self.action == ACTION_DENY
    }
}

/// Key of the per-CPU counter map: the interface the program runs on. Pod attachments
/// are host-side veths (tc ingress), host attachments are uplinks (tc egress); both live
/// in the host network namespace, so the ifindex identifies the attachment.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CounterKey {
    pub ifindex: u32,
}

/// Per-CPU packet/byte counters of one attachment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub allowed_packets: u64,
    pub allowed_bytes: u64,
    pub denied_packets: u64,
    pub denied_bytes: u64,
}

impl Counters {
    /// Adds another CPU's (or attachment's) counters to this one.
    pub fn add(&mut self, other: &Counters) {
        self.allowed_packets += other.allowed_packets;
        self.allowed_bytes += other.allowed_bytes;
        self.denied_packets += other.denied_packets;
        self.denied_bytes += other.denied_bytes;
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, repr(C), no implicit padding.
    unsafe impl aya::Pod for super::RuleValue {}
    unsafe impl aya::Pod for super::CounterKey {}
    unsafe impl aya::Pod for super::Counters {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<RuleValue>(), 4);
        assert_eq!(size_of::<CounterKey>(), 4);
        assert_eq!(size_of::<Counters>(), 32);
    }
}
